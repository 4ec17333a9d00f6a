//! The data path of reduced files (docs/reduce.md, "In the file system"):
//! writes re-chunk the views they touch, store the frames of chunks the
//! dedupe index does not hold in a new segment, and map the new views;
//! reads fetch and decode the frames of the views they cover; garbage
//! collection copies the live frames of sparse segments into full ones;
//! the audit checks the index against the files and every frame.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::files::FileSystem;
use super::reduced::{NewFrame, ReduceTotals, View};
use super::{Attr, ChunkRef, Cmd, Errno, Ino, Reply, Time};
use crate::format::PAGE_SIZE;
use crate::reduce::{ChunkHash, FrameHeader, ReduceError, ReducePolicy, ScopeKeys, decode_all_threads};

const PAGE: u64 = PAGE_SIZE as u64;

/// The largest segment: frames are packed into runs of at most this many
/// bytes.
pub const SEGMENT_SIZE: usize = 2 << 20;

/// Garbage collection copies the frames of segments whose live frames fill
/// less than this share (in percent) of their pages.
pub const GC_LIVE_PERCENT: u64 = 50;

/// Bytes per second garbage collection copies at most, so that foreground
/// I/O keeps its throughput.
pub const GC_RATE: u64 = 64 << 20;

/// Buffers at least this large are encoded and decoded on every core (on
/// a blocking thread); smaller ones on the calling task.
const PARALLEL_FROM: usize = 256 << 10;

/// The reduction side of a file system: its keys and the garbage
/// collector's counters.
pub(super) struct Reduction {
    pub(super) keys: Arc<ScopeKeys>,
    gc: GcCounters,
    /// Tells the garbage collector to stop.
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct GcCounters {
    passes: AtomicU64,
    bytes_moved: AtomicU64,
    frames_moved: AtomicU64,
    segments_freed: AtomicU64,
}

impl Reduction {
    pub(super) fn new(keys: ScopeKeys) -> Reduction {
        Reduction {
            keys: Arc::new(keys),
            gc: GcCounters::default(),
            stop: tokio::sync::watch::channel(false).0,
            task: std::sync::Mutex::default(),
        }
    }
}

/// Statistics of data reduction (`fs_get_reduce_stats`).
#[derive(Debug, Clone, Serialize)]
pub struct ReduceStats {
    /// Totals of the index.
    #[serde(flatten)]
    pub totals: ReduceTotals,
    /// Logical bytes per unique byte stored (before compression).
    pub dedupe_ratio: f64,
    /// Unique bytes per byte of frames.
    pub compression_ratio: f64,
    /// Logical bytes per byte of segment pages: the whole reduction.
    pub reduction_ratio: f64,
    /// Garbage collection passes that moved something.
    pub gc_passes: u64,
    /// Bytes of frames garbage collection copied.
    pub gc_bytes_moved: u64,
    /// Frames it copied.
    pub gc_frames_moved: u64,
    /// Segments it emptied and freed.
    pub gc_segments_freed: u64,
    /// Segments it would copy now (live below the threshold).
    pub gc_candidates: u64,
}

/// What one garbage collection pass did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GcPass {
    /// Frames copied.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Segments emptied and freed.
    pub segments_freed: u64,
}

/// What [`FileSystem::reduce_audit`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    /// Reduced files.
    pub files: u64,
    /// Views of their data.
    pub views: u64,
    /// Chunks in the index.
    pub chunks: u64,
    /// Segments.
    pub segments: u64,
    /// Frames read and decoded.
    pub frames_checked: u64,
    /// Chunks whose count differs from the views naming them:
    /// (chunk, count, views).
    pub refcount_mismatches: Vec<(String, u64, u64)>,
    /// Logical bytes recorded, when they differ from what the views hold.
    pub logical_mismatch: Option<(u64, u64)>,
    /// Views naming chunks the index does not hold: (file, offset, chunk).
    pub missing_chunks: Vec<(Ino, u64, String)>,
    /// Frames that do not decode: (chunk, segment, problem, files naming it).
    pub corrupt_chunks: Vec<(String, u64, String, Vec<Ino>)>,
    /// The structural check of the index, if it failed.
    pub structure: Option<String>,
    /// Whether counts were repaired.
    pub repaired: bool,
}

impl AuditReport {
    /// Whether nothing is wrong.
    pub fn clean(&self) -> bool {
        self.refcount_mismatches.is_empty()
            && self.logical_mismatch.is_none()
            && self.missing_chunks.is_empty()
            && self.corrupt_chunks.is_empty()
            && self.structure.is_none()
    }
}

/// A view to read, with where its chunk's frame is.
struct Located {
    offset: u64,
    view: View,
    /// The segment's run, the frame's offset in it and its length.
    run: ChunkRef,
    at: u32,
    len: u32,
}

impl FileSystem {
    /// Reads a reduced file's bytes `[offset, offset + out.len())` within
    /// its size into `out`; returns how many. Holes read as zeros.
    pub(super) async fn read_reduced(&self, ino: Ino, offset: u64, out: &mut [u8]) -> Result<usize, Errno> {
        let _ticket = self.data.ticket();
        let (end, located) = self.meta.read(|s| {
            let size = s.getattr(ino)?.size;
            let end = size.min(offset.saturating_add(out.len() as u64));
            if end <= offset {
                return Ok((end, Vec::new()));
            }
            let index = s.reduce_index();
            let mut located = Vec::new();
            for (k, v) in s.views(ino, offset, end)? {
                let Some(c) = index.get(&v.hash) else {
                    tracing::error!("file {ino}: the view at byte {k} names chunk {}, which is not stored", v.hash);
                    return Err(Errno::EIO);
                };
                let seg = index.segment(c.segment).ok_or(Errno::EIO)?;
                located.push(Located { offset: k, view: v, run: seg.run, at: c.offset, len: c.len });
            }
            Ok((end, located))
        })?;
        if end <= offset {
            return Ok(0);
        }
        let n = (end - offset) as usize;
        out[..n].fill(0);
        let chunks = self.fetch(ino, &located).await?;
        for l in &located {
            let plain = &chunks[&l.view.hash];
            let (from, to) = (offset.max(l.offset), end.min(l.offset + u64::from(l.view.len)));
            let src = l.view.skip as usize + (from - l.offset) as usize;
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&plain[src..src + (to - from) as usize]);
        }
        Ok(n)
    }

    /// Reads and decodes the chunks of `located` (each once).
    async fn fetch(&self, ino: Ino, located: &[Located]) -> Result<BTreeMap<ChunkHash, Vec<u8>>, Errno> {
        let mut distinct: BTreeMap<ChunkHash, &Located> = BTreeMap::new();
        for l in located {
            distinct.entry(l.view.hash).or_insert(l);
        }
        let reads = distinct.values().map(|l| self.read_frame(l.run, l.at, l.len));
        let frames = futures_util::future::try_join_all(reads).await?;
        let hashes: Vec<ChunkHash> = distinct.keys().copied().collect();
        let keys = self.reduction.keys.clone();
        let total: usize = frames.iter().map(Vec::len).sum();
        let decode = move || {
            let pairs: Vec<(ChunkHash, &[u8])> = hashes.iter().copied().zip(frames.iter().map(Vec::as_slice)).collect();
            let threads = if total >= PARALLEL_FROM { crate::reduce::default_threads() } else { 1 };
            let plain = decode_all_threads(&keys, &pairs, threads)?;
            // Split by the frames' raw lengths (decode_all checked the headers).
            let mut out = BTreeMap::new();
            let mut at = 0;
            for (hash, frame) in pairs {
                let raw = FrameHeader::parse(frame).map(|h| h.raw_len as usize).unwrap_or(0);
                out.insert(hash, plain[at..at + raw].to_vec());
                at += raw;
            }
            Ok::<_, crate::reduce::ReduceError>(out)
        };
        let decoded = if total >= PARALLEL_FROM {
            tokio::task::spawn_blocking(decode).await.map_err(|_| Errno::EIO)?
        } else {
            decode()
        };
        decoded.map_err(|e| {
            tracing::error!("file {ino}: {e}");
            Errno::EIO
        })
    }

    /// The `len` bytes of a frame at byte `at` of a segment.
    async fn read_frame(&self, run: ChunkRef, at: u32, len: u32) -> Result<Vec<u8>, Errno> {
        let (first, last) = (u64::from(at) / PAGE, (u64::from(at) + u64::from(len)).div_ceil(PAGE));
        if last > u64::from(run.pages) {
            tracing::error!("a frame at byte {at} (+{len}) lies beyond its segment of {} pages", run.pages);
            return Err(Errno::EIO);
        }
        let mut frame = vec![0; len as usize];
        self.data.read(run.sub(first, last - first), (u64::from(at) % PAGE) as usize, &mut frame).await?;
        Ok(frame)
    }

    /// Writes `data` at `offset` of a reduced file: the views the write
    /// touches (and the file's last view, when it appends) are read,
    /// patched, chunked and encoded again, and replace what they held.
    pub(super) async fn write_reduced(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        now: Time,
        policy: ReducePolicy,
    ) -> Result<Attr, Errno> {
        let end = offset + data.len() as u64;
        let lock = self.writer(ino);
        let _alone = lock.write().await;
        let (from, to) = self.meta.read(|s| {
            let size = s.getattr(ino)?.size;
            // An append re-chunks the last view too: its end was cut by the
            // end of the previous write, not by the content.
            let start = if offset == size { offset.saturating_sub(1) } else { offset };
            let views = s.views(ino, start, end)?;
            let from = views.first().map_or(offset, |&(k, _)| k.min(offset));
            let to = views.last().map_or(end, |&(k, v)| (k + u64::from(v.len)).max(end));
            Ok((from, to))
        })?;
        let mut buf = vec![0; (to - from) as usize];
        self.read_reduced(ino, from, &mut buf).await?;
        buf[(offset - from) as usize..][..data.len()].copy_from_slice(data);
        self.store_chunks(ino, from, policy, buf, end, now).await
    }

    /// Runs CPU work on the calling task, or, for `parallel` work (large
    /// buffers, spread over every core), on a blocking thread.
    async fn cpu<T: Send + 'static>(parallel: bool, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Errno> {
        if parallel { tokio::task::spawn_blocking(work).await.map_err(|_| Errno::EIO) } else { Ok(work()) }
    }

    /// Chunks `buf` (file bytes from `from` on) with `policy`, stores the
    /// frames of chunks the index does not hold, in segments, and maps the
    /// chunks over the buffer's range. Chunks are hashed first and only
    /// those the index lacks are compressed and encrypted. A chunk the
    /// index held when this began but lost before the command applied makes
    /// it store every frame and try again.
    async fn store_chunks(
        &self,
        ino: Ino,
        from: u64,
        policy: ReducePolicy,
        buf: Vec<u8>,
        end: u64,
        now: Time,
    ) -> Result<Attr, Errno> {
        let to = from + buf.len() as u64;
        let buf = Arc::new(buf);
        let keys = self.reduction.keys.clone();
        let parallel = buf.len() >= PARALLEL_FROM;
        let cuts = {
            let (buf, keys) = (buf.clone(), keys.clone());
            Self::cpu(parallel, move || {
                let chunker = policy.chunking.chunker()?;
                chunker
                    .chunks(&buf)
                    .map(|r| keys.hash(policy.encrypt, &buf[r.clone()]).map(|h| (r, h)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?
            .map_err(encode_err)?
        };
        let views: Vec<(u64, View)> = cuts
            .iter()
            .map(|(r, h)| (from + r.start as u64, View { hash: *h, skip: 0, len: r.len() as u32 }))
            .collect();
        let mut frames: BTreeMap<ChunkHash, Vec<u8>> = BTreeMap::new();
        for dedupe in [true, false] {
            let stored: BTreeSet<ChunkHash> = if dedupe {
                self.meta.read(|s| cuts.iter().map(|c| c.1).filter(|h| s.reduce_index().get(h).is_some()).collect())
            } else {
                BTreeSet::new()
            };
            // The chunks to store, each once, in file order.
            let mut seen = stored;
            let wanted: Vec<(std::ops::Range<usize>, ChunkHash)> =
                cuts.iter().filter(|(_, h)| seen.insert(*h)).cloned().collect();
            let missing: Vec<(std::ops::Range<usize>, ChunkHash)> =
                wanted.iter().filter(|(_, h)| !frames.contains_key(h)).cloned().collect();
            let bytes: usize = missing.iter().map(|(r, _)| r.len()).sum();
            let (b, k) = (buf.clone(), keys.clone());
            let encoded = Self::cpu(bytes >= PARALLEL_FROM, move || encode_chunks(&policy, &k, &b, &missing))
                .await?
                .map_err(encode_err)?;
            frames.extend(encoded);
            let list: Vec<(ChunkHash, &[u8], u32)> =
                wanted.iter().map(|(r, h)| (*h, frames[h].as_slice(), r.len() as u32)).collect();
            let segments = self.write_segments(&list).await?;
            let runs: Vec<ChunkRef> = segments.iter().map(|(r, _)| *r).collect();
            let cmd = Cmd::ReduceWrite { ino, from, to, views: views.clone(), segments, end, now };
            match self.apply(cmd).await {
                Ok(reply) => return Ok(super::files::attributes(reply)),
                Err(e) => {
                    self.data.free(runs);
                    if e != Errno::ESTALE || !dedupe {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!("the second round stores every frame")
    }

    /// Packs frames `(chunk, frame, raw length)` into segments of at most
    /// [`SEGMENT_SIZE`] bytes and writes them to new runs.
    async fn write_segments(
        &self,
        frames: &[(ChunkHash, &[u8], u32)],
    ) -> Result<Vec<(ChunkRef, Vec<NewFrame>)>, Errno> {
        // Groups of consecutive frames, each at most a segment's worth; a
        // group that finds no free run that long is split in two (a
        // fragmented pool still takes the write, in smaller segments).
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let mut bytes = 0;
        for (i, (_, frame, _)) in frames.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if bytes + frame.len() <= SEGMENT_SIZE => g.end = i + 1,
                _ => {
                    groups.push(i..i + 1);
                    bytes = 0;
                }
            }
            bytes += frame.len();
        }
        groups.reverse();
        let mut written: Vec<(ChunkRef, Vec<NewFrame>)> = Vec::new();
        while let Some(group) = groups.pop() {
            match self.write_segment(&frames[group.clone()]).await {
                Ok(seg) => written.push(seg),
                Err(Errno::ENOSPC) if group.len() > 1 => {
                    let mid = group.start + group.len() / 2;
                    groups.push(mid..group.end);
                    groups.push(group.start..mid);
                }
                Err(e) => {
                    self.data.free(written.into_iter().map(|(r, _)| r));
                    return Err(e);
                }
            }
        }
        Ok(written)
    }

    /// Packs `frames` back to back into one new run and writes it.
    async fn write_segment(&self, frames: &[(ChunkHash, &[u8], u32)]) -> Result<(ChunkRef, Vec<NewFrame>), Errno> {
        let mut list = Vec::with_capacity(frames.len());
        let mut bytes = 0;
        for &(hash, frame, raw) in frames {
            list.push(NewFrame { hash, offset: bytes as u32, len: frame.len() as u32, raw });
            bytes += frame.len();
        }
        let pages = (bytes as u64).div_ceil(PAGE);
        let [run] = self.alloc_pages(pages, pages).await?[..] else { unreachable!("a run of one unit is one run") };
        let mut buf = match pmd::DmaBuf::new(pages as usize * PAGE_SIZE) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("no DMA memory for a segment of {pages} pages: {e}");
                self.data.free([run]);
                return Err(Errno::EIO);
            }
        };
        for (f, (_, frame, _)) in list.iter().zip(frames) {
            buf[f.offset as usize..][..frame.len()].copy_from_slice(frame);
        }
        buf[bytes..].fill(0);
        if let Err(e) = self.data.write(run, buf).await {
            self.data.free([run]);
            return Err(e);
        }
        Ok((run, list))
    }

    /// Zeroes `[offset, end)` of a reduced file (fallocate's punch-hole and
    /// zero-range): the views there go, those across the edges are cut.
    pub(super) async fn punch_reduced(&self, ino: Ino, offset: u64, end: u64, now: Time) -> Result<Attr, Errno> {
        let cmd = Cmd::ReduceWrite { ino, from: offset, to: end, views: Vec::new(), segments: Vec::new(), end: 0, now };
        self.apply(cmd).await.map(super::files::attributes)
    }

    /// Data-reduction statistics.
    pub fn reduce_stats(&self) -> ReduceStats {
        let (totals, candidates) =
            self.meta.read(|s| (s.reduce_index().totals(), gc_candidates(s.reduce_index()).len() as u64));
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        let gc = &self.reduction.gc;
        ReduceStats {
            dedupe_ratio: ratio(totals.logical_bytes, totals.unique_bytes),
            compression_ratio: ratio(totals.unique_bytes, totals.stored_bytes),
            reduction_ratio: ratio(totals.logical_bytes, totals.segment_bytes),
            totals,
            gc_passes: gc.passes.load(Ordering::Relaxed),
            gc_bytes_moved: gc.bytes_moved.load(Ordering::Relaxed),
            gc_frames_moved: gc.frames_moved.load(Ordering::Relaxed),
            gc_segments_freed: gc.segments_freed.load(Ordering::Relaxed),
            gc_candidates: candidates,
        }
    }

    /// One garbage collection pass: copies the live frames of the sparsest
    /// segments below `GC_LIVE_PERCENT` (up to one segment's worth) into
    /// a new segment. Returns `None` when no segment qualifies.
    pub async fn gc_pass(&self) -> Result<Option<GcPass>, Errno> {
        let _ticket = self.data.ticket();
        let plan = self.meta.read(|s| {
            let index = s.reduce_index();
            let mut picked: Vec<(u64, ChunkRef)> = Vec::new();
            let mut bytes = 0;
            for (id, live) in gc_candidates(index) {
                if bytes + live > SEGMENT_SIZE as u64 && !picked.is_empty() {
                    break;
                }
                bytes += live;
                picked.push((id, index.segment(id).expect("a candidate exists").run));
            }
            // Only worth it when the live frames take fewer pages than the
            // segments they are in (else a lone sparse segment would be
            // copied again and again).
            let pages: u64 = picked.iter().map(|(_, run)| u64::from(run.pages)).sum();
            if bytes.div_ceil(PAGE) >= pages {
                picked.clear();
            }
            let ids: BTreeSet<u64> = picked.iter().map(|&(id, _)| id).collect();
            let frames: Vec<(ChunkHash, u64, u32, u32, u32)> = index
                .chunks()
                .filter(|(_, c)| ids.contains(&c.segment))
                .map(|(h, c)| (*h, c.segment, c.offset, c.len, c.raw))
                .collect();
            (picked, frames)
        });
        let (picked, frames) = plan;
        if picked.is_empty() {
            return Ok(None);
        }
        let mut copied: Vec<(ChunkHash, u64, Vec<u8>, u32)> = Vec::with_capacity(frames.len());
        for (hash, segment, at, len, raw) in frames {
            let run = picked.iter().find(|&&(id, _)| id == segment).expect("picked").1;
            let frame = self.read_frame(run, at, len).await?;
            // Copy only what is what the index says it is: the frame's own
            // header names its chunk and length.
            match FrameHeader::parse(&frame) {
                Ok(h) if h.hash == hash && h.frame_len() == frame.len() => copied.push((hash, segment, frame, raw)),
                Ok(_) | Err(_) => {
                    tracing::error!(
                        "garbage collection: the frame of chunk {hash} in segment {segment} is damaged; left in place"
                    );
                }
            }
        }
        let list: Vec<(ChunkHash, &[u8], u32)> = copied.iter().map(|(h, _, f, raw)| (*h, f.as_slice(), *raw)).collect();
        let bytes: u64 = list.iter().map(|(_, f, _)| f.len() as u64).sum();
        let mut pass = GcPass { frames: list.len() as u64, bytes, segments_freed: 0 };
        if list.is_empty() {
            return Ok(Some(pass));
        }
        let segments = self.write_segments(&list).await?;
        // One move per new segment (one, unless the pool was too fragmented
        // for a run of their size); the frames are in order across them.
        let mut copied = copied.iter();
        let mut segments = segments.into_iter();
        while let Some((run, placed)) = segments.next() {
            let moves = placed.iter().zip(copied.by_ref()).map(|(f, (h, old, _, _))| (*h, *old, f.offset)).collect();
            match self.apply(Cmd::ReduceMove { segment: run, moves }).await {
                Ok(Reply::Freed(runs)) => pass.segments_freed += runs.iter().filter(|&&r| r != run).count() as u64,
                Ok(_) => {}
                Err(e) => {
                    self.data.free(std::iter::once(run).chain(segments.map(|(r, _)| r)));
                    return Err(e);
                }
            }
        }
        let gc = &self.reduction.gc;
        gc.passes.fetch_add(1, Ordering::Relaxed);
        gc.bytes_moved.fetch_add(pass.bytes, Ordering::Relaxed);
        gc.frames_moved.fetch_add(pass.frames, Ordering::Relaxed);
        gc.segments_freed.fetch_add(pass.segments_freed, Ordering::Relaxed);
        Ok(Some(pass))
    }

    /// Runs garbage collection passes until no segment qualifies.
    pub async fn collect_garbage(&self) -> Result<GcPass, Errno> {
        let mut total = GcPass::default();
        while let Some(p) = self.gc_pass().await? {
            if p.frames == 0 {
                break;
            }
            total.frames += p.frames;
            total.bytes += p.bytes;
            total.segments_freed += p.segments_freed;
        }
        Ok(total)
    }

    /// Starts the background garbage collector: every second, passes until
    /// no segment qualifies, at most `GC_RATE` bytes per second. Stopped
    /// by [`FileSystem::shutdown`].
    pub fn start_gc(self: &Arc<Self>) {
        let fs = Arc::downgrade(self);
        let mut stop = self.reduction.stop.subscribe();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                loop {
                    let Some(fs) = fs.upgrade() else { return };
                    if *stop.borrow() {
                        return;
                    }
                    let pass = fs.gc_pass().await;
                    drop(fs);
                    match pass {
                        Ok(Some(p)) if p.frames > 0 => {
                            // The rate limit: a pass of B bytes is followed by B / rate seconds of rest.
                            let rest = Duration::from_secs_f64(p.bytes as f64 / GC_RATE as f64);
                            tokio::select! {
                                _ = stop.changed() => return,
                                _ = tokio::time::sleep(rest) => {}
                            }
                        }
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!("garbage collection pass failed: {e}; retrying later");
                            break;
                        }
                    }
                }
            }
        });
        *self.reduction.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Stops the background garbage collector and waits for it.
    pub(super) async fn stop_gc(&self) {
        self.reduction.stop.send_replace(true);
        let task = self.reduction.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Checks the dedupe index against every reduced file and decodes every
    /// stored frame; with `repair`, sets counts that are wrong to what the
    /// files say (a chunk no file names leaves the index). Damaged frames
    /// cannot be repaired: they are reported with the files that need them.
    pub async fn reduce_audit(&self, repair: bool) -> Result<AuditReport, Errno> {
        let _ticket = self.data.ticket();
        let mut report = AuditReport::default();
        let (refs, logical, recorded, segments, chunks) = self.meta.read(|s| {
            let index = s.reduce_index();
            let mut refs: BTreeMap<ChunkHash, (u64, Vec<Ino>)> = BTreeMap::new();
            let mut logical = 0;
            let mut files = BTreeSet::new();
            for (ino, k, v) in s.all_views() {
                files.insert(ino);
                report.views += 1;
                logical += u64::from(v.len);
                let e = refs.entry(v.hash).or_default();
                e.0 += 1;
                if e.1.last() != Some(&ino) {
                    e.1.push(ino);
                }
                if index.get(&v.hash).is_none() {
                    report.missing_chunks.push((ino, k, v.hash.to_string()));
                }
            }
            report.files = files.len() as u64;
            report.structure = s.reduce_index().check(s.all_views().map(|(_, _, v)| v)).err();
            let segments: Vec<(u64, ChunkRef)> = index.segments().map(|(id, seg)| (id, seg.run)).collect();
            let chunks: Vec<(ChunkHash, u64, u32, u32, u64)> =
                index.chunks().map(|(h, c)| (*h, c.segment, c.offset, c.len, c.refs)).collect();
            (refs, logical, index.totals().logical_bytes, segments, chunks)
        });
        report.chunks = chunks.len() as u64;
        report.segments = segments.len() as u64;
        let mut fixes = Vec::new();
        for &(hash, _, _, _, count) in &chunks {
            let views = refs.get(&hash).map_or(0, |r| r.0);
            if views != count {
                report.refcount_mismatches.push((hash.to_string(), count, views));
                fixes.push((hash, views));
            }
        }
        if logical != recorded {
            report.logical_mismatch = Some((recorded, logical));
        }
        let runs: BTreeMap<u64, ChunkRef> = segments.into_iter().collect();
        for (hash, segment, at, len, _) in chunks {
            let Some(&run) = runs.get(&segment) else { continue };
            let problem = match self.read_frame(run, at, len).await {
                Ok(frame) => {
                    crate::reduce::decode_chunk(&self.reduction.keys, &hash, &frame).err().map(|e| e.to_string())
                }
                Err(e) => Some(format!("reading the frame: {e}")),
            };
            report.frames_checked += 1;
            if let Some(p) = problem {
                let files = refs.get(&hash).map(|r| r.1.clone()).unwrap_or_default();
                tracing::error!("audit: chunk {hash} in segment {segment} (files {files:?}): {p}");
                report.corrupt_chunks.push((hash.to_string(), segment, p, files));
            }
        }
        if repair && (!fixes.is_empty() || report.logical_mismatch.is_some()) {
            self.apply(Cmd::ReduceRepair { refs: fixes, logical }).await?;
            report.repaired = true;
        }
        Ok(report)
    }
}

/// Segments whose live frames fill less than [`GC_LIVE_PERCENT`] of their
/// pages, sparsest first, with their live bytes.
fn gc_candidates(index: &super::reduced::ReduceIndex) -> Vec<(u64, u64)> {
    let mut c: Vec<(u64, u64, u64)> = index
        .segments()
        .filter(|(_, s)| s.live * 100 < GC_LIVE_PERCENT * u64::from(s.run.pages) * PAGE)
        .map(|(id, s)| (id, s.live, u64::from(s.run.pages) * PAGE))
        .collect();
    c.sort_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)).then(a.0.cmp(&b.0)));
    c.into_iter().map(|(id, live, _)| (id, live)).collect()
}

/// Encodes the chunks `ranges` of `buf` (hash known), on every core when
/// there are many bytes; their frames by hash.
fn encode_chunks(
    policy: &ReducePolicy,
    keys: &ScopeKeys,
    buf: &[u8],
    chunks: &[(std::ops::Range<usize>, ChunkHash)],
) -> Result<Vec<(ChunkHash, Vec<u8>)>, ReduceError> {
    let bytes: usize = chunks.iter().map(|(r, _)| r.len()).sum();
    let threads = if bytes >= PARALLEL_FROM { crate::reduce::default_threads().min(chunks.len()).max(1) } else { 1 };
    // One codec per thread (a Zstd context is costly to make); the chunks
    // were hashed when they were looked up in the index.
    let encode = |part: &[(std::ops::Range<usize>, ChunkHash)]| {
        let mut codec = crate::reduce::compress::Codec::default();
        part.iter()
            .map(|(r, h)| {
                crate::reduce::frame::encode_hashed(&mut codec, policy, keys, &buf[r.clone()], *h).map(|f| (*h, f))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    if threads == 1 {
        return encode(chunks);
    }
    let per = chunks.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = chunks.chunks(per).map(|part| s.spawn(move || encode(part))).collect();
        let mut out = Vec::with_capacity(chunks.len());
        for p in parts {
            out.extend(p.join().expect("an encoding worker panicked")?);
        }
        Ok(out)
    })
}

fn encode_err(e: ReduceError) -> Errno {
    tracing::error!("encoding file data: {e}");
    Errno::EIO
}
