//! The metadata of reduced files (docs/reduce.md, "In the file system"):
//! the dedupe index, the segments its frames live in, and the *views* a
//! reduced file's map is made of.
//!
//! A reduced file maps byte offsets to views: bytes `[skip, skip + len)` of
//! the chunk with a given content hash. The index maps each hash to where
//! its frame is stored (a segment, an offset and a length in it) and counts
//! the views that name it; a segment is a run of pool pages holding frames
//! back to back, and counts the frames of the index in it. A chunk whose
//! count falls to zero leaves the index; a segment with no frame left is
//! freed. Truncating, punching holes and overwriting a part of a view only
//! cut views: nothing is rewritten to shrink a file.
//!
//! This lives in the replicated state, so it is as crash-safe as the rest
//! of the metadata: a segment is written before the command that names it,
//! and a crash between the two leaves pages that no map names, free again
//! at the next start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::{ChunkRef, Errno};
use crate::reduce::{ChunkHash, MAX_CHUNK_SIZE, ReducePolicy};

/// Bytes `[skip, skip + len)` of the chunk `hash`, at some offset of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The chunk.
    pub hash: ChunkHash,
    /// Bytes of the chunk before the view.
    pub skip: u32,
    /// Bytes in the view.
    pub len: u32,
}

/// Where a chunk's frame is, and how many views name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The segment.
    pub segment: u64,
    /// Byte offset of the frame in the segment.
    pub offset: u32,
    /// Bytes of the frame.
    pub len: u32,
    /// Bytes of the chunk (plaintext).
    pub raw: u32,
    /// Views naming the chunk.
    pub refs: u64,
}

/// A run of pool pages holding frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Its pages.
    pub run: ChunkRef,
    /// Frames of the index stored in it.
    pub frames: u32,
    /// Their bytes.
    pub live: u64,
}

/// A frame a command stores: its chunk, where it is in the command's
/// segment, its length and its chunk's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewFrame {
    /// The chunk.
    pub hash: ChunkHash,
    /// Byte offset in the segment.
    pub offset: u32,
    /// Bytes of the frame.
    pub len: u32,
    /// Bytes of the chunk.
    pub raw: u32,
}

/// The views of `map` reaching into `[from, to)`, in order, with their
/// offsets.
pub fn overlapping(map: &BTreeMap<u64, View>, from: u64, to: u64) -> impl Iterator<Item = (u64, View)> + '_ {
    // The view starting at or before `from` may reach into the range.
    let first = map.range(..=from).next_back().map_or(from, |(&k, _)| k);
    map.range(first..to.max(first)).filter(move |&(&k, v)| k + u64::from(v.len) > from).map(|(&k, &v)| (k, v))
}

/// A policy xattr's value, if it is one (surrounding blanks allowed).
pub fn parse_policy(value: &[u8]) -> Option<ReducePolicy> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// The dedupe index and the segments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReduceIndex {
    chunks: BTreeMap<ChunkHash, Stored>,
    segments: BTreeMap<u64, Segment>,
    next_segment: u64,
    /// Bytes of all views: what the files hold.
    logical: u64,
}

/// Totals of the index, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReduceTotals {
    /// Bytes the views of all reduced files hold.
    pub logical_bytes: u64,
    /// Bytes of the distinct chunks stored (before compression).
    pub unique_bytes: u64,
    /// Bytes of their frames (after compression, with headers).
    pub stored_bytes: u64,
    /// Bytes of the segments' pages (what the store gave them).
    pub segment_bytes: u64,
    /// Chunks in the index.
    pub chunks: u64,
    /// Segments.
    pub segments: u64,
}

impl ReduceIndex {
    /// Where a chunk is stored, if it is.
    pub fn get(&self, hash: &ChunkHash) -> Option<&Stored> {
        self.chunks.get(hash)
    }

    /// A segment.
    pub fn segment(&self, id: u64) -> Option<&Segment> {
        self.segments.get(&id)
    }

    /// Every segment, by id.
    pub fn segments(&self) -> impl Iterator<Item = (u64, &Segment)> {
        self.segments.iter().map(|(&id, s)| (id, s))
    }

    /// Every chunk of the index.
    pub fn chunks(&self) -> impl Iterator<Item = (&ChunkHash, &Stored)> {
        self.chunks.iter()
    }

    /// Totals, for statistics.
    pub fn totals(&self) -> ReduceTotals {
        let page = crate::format::PAGE_SIZE as u64;
        ReduceTotals {
            logical_bytes: self.logical,
            unique_bytes: self.chunks.values().map(|c| u64::from(c.raw)).sum(),
            stored_bytes: self.chunks.values().map(|c| u64::from(c.len)).sum(),
            segment_bytes: self.segments.values().map(|s| u64::from(s.run.pages) * page).sum(),
            chunks: self.chunks.len() as u64,
            segments: self.segments.len() as u64,
        }
    }

    /// The chunk of `hash` as a new frame would store it, or as the index
    /// does: its length, or `None` if neither knows it.
    fn raw_len(&self, hash: &ChunkHash, frames: &[(ChunkRef, Vec<NewFrame>)]) -> Option<u32> {
        self.chunks
            .get(hash)
            .map(|c| c.raw)
            .or_else(|| frames.iter().flat_map(|(_, f)| f).find(|f| f.hash == *hash).map(|f| f.raw))
    }

    /// Checks what a command would store and map, before anything changes:
    /// segments whose frames lie within them, views of chunks that are (or
    /// will be) stored and lie within them, in order, without overlap,
    /// within `[from, to)`.
    pub fn check_write(
        &self,
        from: u64,
        to: u64,
        views: &[(u64, View)],
        segments: &[(ChunkRef, Vec<NewFrame>)],
    ) -> Result<(), Errno> {
        let page = crate::format::PAGE_SIZE as u64;
        for (run, frames) in segments {
            let bytes = u64::from(run.pages) * page;
            if run.pages == 0
                || frames.is_empty()
                || frames.iter().any(|f| {
                    u64::from(f.offset) + u64::from(f.len) > bytes || f.raw as usize > MAX_CHUNK_SIZE || f.len == 0
                })
            {
                return Err(Errno::EINVAL);
            }
        }
        let mut at = from;
        for &(offset, v) in views {
            if offset < at || v.len == 0 || offset.checked_add(u64::from(v.len)).is_none_or(|e| e > to) {
                return Err(Errno::EINVAL);
            }
            match self.raw_len(&v.hash, segments) {
                Some(raw) if u64::from(v.skip) + u64::from(v.len) <= u64::from(raw) => {}
                // A chunk deduplicated against the index when the write was
                // prepared, and gone since: the writer stores it and retries.
                None => return Err(Errno::ESTALE),
                Some(_) => return Err(Errno::EINVAL),
            }
            at = offset + u64::from(v.len);
        }
        Ok(())
    }

    /// Stores the frames of checked `segments` (those of chunks not in the
    /// index yet), then replaces `[from, to)` of `map` by `views`. Returns
    /// the segments' runs let go of: segments none of whose frames was
    /// needed, and those whose last chunk went.
    pub fn write(
        &mut self,
        map: &mut BTreeMap<u64, View>,
        from: u64,
        to: u64,
        views: &[(u64, View)],
        segments: &[(ChunkRef, Vec<NewFrame>)],
    ) -> Vec<ChunkRef> {
        let mut freed = Vec::new();
        for (run, frames) in segments {
            let id = self.next_segment;
            self.next_segment += 1;
            let mut seg = Segment { run: *run, frames: 0, live: 0 };
            for f in frames {
                if let std::collections::btree_map::Entry::Vacant(e) = self.chunks.entry(f.hash) {
                    e.insert(Stored { segment: id, offset: f.offset, len: f.len, raw: f.raw, refs: 0 });
                    seg.frames += 1;
                    seg.live += u64::from(f.len);
                }
            }
            if seg.frames == 0 {
                freed.push(*run);
            } else {
                self.segments.insert(id, seg);
            }
        }
        let mut dropped = self.unmap(map, from, to);
        for &(offset, v) in views {
            self.reference(v);
            map.insert(offset, v);
        }
        // Frames stored for chunks no view names (a chunk stored twice by
        // one command) are dropped with the rest.
        dropped.extend(segments.iter().flat_map(|(_, f)| f).map(|f| View { hash: f.hash, skip: 0, len: 0 }));
        freed.extend(self.release(dropped));
        freed
    }

    /// Cuts `[from, to)` out of `map`: views inside go, views across an
    /// edge keep what lies outside. Counts the views kept and returns those
    /// let go of, whose counts [`ReduceIndex::release`] lowers (after any
    /// new reference, so that a chunk moving within a file is not dropped
    /// on the way).
    pub fn unmap(&mut self, map: &mut BTreeMap<u64, View>, from: u64, to: u64) -> Vec<View> {
        let hit: Vec<(u64, View)> = overlapping(map, from, to).collect();
        let mut dropped = Vec::new();
        for (k, v) in hit {
            let end = k + u64::from(v.len);
            map.remove(&k);
            if k < from {
                let head = View { len: (from - k) as u32, ..v };
                self.reference(head);
                map.insert(k, head);
            }
            if end > to {
                let tail = View { skip: v.skip + (to - k) as u32, len: (end - to) as u32, ..v };
                self.reference(tail);
                map.insert(to, tail);
            }
            dropped.push(v);
        }
        dropped
    }

    fn reference(&mut self, v: View) {
        let c = self.chunks.get_mut(&v.hash).expect("a checked view names a stored chunk");
        c.refs += 1;
        self.logical += u64::from(v.len);
    }

    /// Lowers the counts of `views`; chunks no view names any more leave
    /// the index, and the runs of segments left without a frame are
    /// returned. A view of length 0 lowers nothing: it only has its chunk
    /// dropped if nothing names it.
    pub fn release(&mut self, views: Vec<View>) -> Vec<ChunkRef> {
        let mut freed = Vec::new();
        for v in views {
            let Some(c) = self.chunks.get_mut(&v.hash) else { continue };
            if v.len > 0 {
                c.refs -= 1;
                self.logical -= u64::from(v.len);
            }
            if c.refs == 0 {
                let c = self.chunks.remove(&v.hash).expect("just found");
                freed.extend(self.drop_frame(c.segment, c.len));
            }
        }
        freed
    }

    /// Takes a frame of `len` bytes out of segment `id`; returns its run if
    /// that was its last frame.
    fn drop_frame(&mut self, id: u64, len: u32) -> Option<ChunkRef> {
        let seg = self.segments.get_mut(&id).expect("an indexed chunk's segment exists");
        seg.frames -= 1;
        seg.live -= u64::from(len);
        (seg.frames == 0).then(|| self.segments.remove(&id).expect("just found").run)
    }

    /// Moves chunks into a new segment `run` (garbage collection): each
    /// `(hash, from segment, offset)` whose chunk is still stored in that
    /// segment now points at `offset` of the new one. Returns the runs let
    /// go of: emptied segments, and the new one if nothing moved into it.
    pub fn relocate(&mut self, run: ChunkRef, moves: &[(ChunkHash, u64, u32)]) -> Vec<ChunkRef> {
        let id = self.next_segment;
        self.next_segment += 1;
        let mut seg = Segment { run, frames: 0, live: 0 };
        let mut freed = Vec::new();
        for &(hash, from, offset) in moves {
            let Some(c) = self.chunks.get_mut(&hash) else { continue };
            if c.segment != from {
                continue;
            }
            let (old, len) = (c.segment, c.len);
            c.segment = id;
            c.offset = offset;
            seg.frames += 1;
            seg.live += u64::from(len);
            freed.extend(self.drop_frame(old, len));
        }
        if seg.frames == 0 {
            freed.push(run);
        } else {
            self.segments.insert(id, seg);
        }
        freed
    }

    /// Sets the counts of chunks (the audit's repair): a chunk set to zero
    /// leaves the index. Returns the runs let go of.
    pub fn set_refs(&mut self, refs: &[(ChunkHash, u64)]) -> Vec<ChunkRef> {
        let mut freed = Vec::new();
        for &(hash, n) in refs {
            let Some(c) = self.chunks.get_mut(&hash) else { continue };
            c.refs = n;
            if n == 0 {
                let c = self.chunks.remove(&hash).expect("just found");
                freed.extend(self.drop_frame(c.segment, c.len));
            }
        }
        freed
    }

    /// Sets the logical byte count (the audit's repair).
    pub fn set_logical(&mut self, logical: u64) {
        self.logical = logical;
    }

    /// Runs of every segment (to rebuild the page allocator).
    pub fn runs(&self) -> impl Iterator<Item = ChunkRef> + '_ {
        self.segments.values().map(|s| s.run)
    }

    /// Checks the index against the views of all files: every view names a
    /// stored chunk and lies within it, counts equal the views naming each
    /// chunk, segment counts add up, no two frames overlap.
    pub fn check<'a>(&self, views: impl Iterator<Item = &'a View>) -> Result<(), String> {
        let mut refs: BTreeMap<ChunkHash, u64> = BTreeMap::new();
        let mut logical = 0;
        for v in views {
            let Some(c) = self.chunks.get(&v.hash) else {
                return Err(format!("a view names chunk {}, which is not stored", v.hash));
            };
            if v.len == 0 || u64::from(v.skip) + u64::from(v.len) > u64::from(c.raw) {
                return Err(format!("a view of chunk {} ({}+{}) is empty or exceeds it", v.hash, v.skip, v.len));
            }
            *refs.entry(v.hash).or_default() += 1;
            logical += u64::from(v.len);
        }
        // Per segment: frames, their bytes, and (offset, length) of each.
        type Seen = (u32, u64, Vec<(u32, u32)>);
        let mut segs: BTreeMap<u64, Seen> = BTreeMap::new();
        for (hash, c) in &self.chunks {
            let n = refs.get(hash).copied().unwrap_or(0);
            if c.refs != n {
                return Err(format!("chunk {hash}: count {}, but {n} views name it", c.refs));
            }
            let Some(seg) = self.segments.get(&c.segment) else {
                return Err(format!("chunk {hash}: segment {} does not exist", c.segment));
            };
            if u64::from(c.offset) + u64::from(c.len) > u64::from(seg.run.pages) * crate::format::PAGE_SIZE as u64 {
                return Err(format!("chunk {hash}: frame beyond its segment {}", c.segment));
            }
            let e = segs.entry(c.segment).or_default();
            e.0 += 1;
            e.1 += u64::from(c.len);
            e.2.push((c.offset, c.len));
        }
        for (id, s) in &self.segments {
            let (frames, live, mut spans) = segs.remove(id).unwrap_or_default();
            if (s.frames, s.live) != (frames, live) {
                return Err(format!(
                    "segment {id}: {} frames of {} bytes, but the index has {frames} of {live}",
                    s.frames, s.live
                ));
            }
            spans.sort_unstable();
            if spans.windows(2).any(|w| u64::from(w[0].0) + u64::from(w[0].1) > u64::from(w[1].0)) {
                return Err(format!("segment {id}: frames overlap"));
            }
        }
        if logical != self.logical {
            return Err(format!("logical bytes {}, but the views hold {logical}", self.logical));
        }
        Ok(())
    }
}
