//! The journal ring: laying records out (writing) and reading them back
//! (replay), as pure functions over pages, so that both are tested and
//! fuzzed without a device.
//!
//! Records are written whole and in order, one write (a *batch*) at a time;
//! a record never straddles the end of the ring: if it does not fit, a wrap
//! marker (consuming one record number) sends the reader back to page 0.
//! Every page of a batch carries the batch's first record number (`aux`).
//!
//! Replay starts at the checkpoint's position and applies records while the
//! next expected record is there, complete and checking. It stops at the
//! first page that is not: a page from an earlier lap, a page never written,
//! or a damaged page. Since a batch is written only after the previous one
//! completed, a damaged page followed anywhere in the ring by a valid page of
//! a *later* batch is corruption (refused, with its location); otherwise it is
//! the torn tail of the last batch, whose records were never acknowledged.

use crate::format::{JournalPos, Op, PAGE_SIZE, PageKind, Seed, decode_ops, decode_page, encode_ops, encode_pages};
use crate::state::{ApplyError, State};

/// Where to write what: pages at a ring position.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// First ring page.
    pub page: u64,
    /// Whole pages.
    pub bytes: Vec<u8>,
}

/// Lays out records (each a list of ops) from `tail` in a ring of `ring`
/// pages. Returns the writes, the new tail and the pages consumed (including
/// a skipped ring end), or `None` if they need more than `free` pages.
pub(crate) fn layout(
    records: &[Vec<Op>],
    tail: JournalPos,
    ring: u64,
    free: u64,
    seed: Seed,
) -> Option<(Vec<Placement>, JournalPos, u64)> {
    let batch = tail.seq;
    let mut pos = tail;
    let mut used = 0u64;
    let mut out: Vec<Placement> = Vec::new();
    let push = |page: u64, bytes: Vec<u8>, out: &mut Vec<Placement>| match out.last_mut() {
        Some(last) if last.page + (last.bytes.len() / PAGE_SIZE) as u64 == page => last.bytes.extend_from_slice(&bytes),
        _ => out.push(Placement { page, bytes }),
    };
    for ops in records {
        let pages = encode_pages(PageKind::Journal, 0, 0, &encode_ops(ops), seed).len() as u64 / PAGE_SIZE as u64;
        if pages >= ring {
            return None; // a record larger than the whole journal can never be written
        }
        if pos.page + pages > ring {
            let skipped = ring - pos.page;
            push(pos.page, encode_pages(PageKind::JournalWrap, pos.seq, batch, &[], seed), &mut out);
            used += skipped;
            pos = JournalPos { seq: pos.seq + 1, page: 0 };
        }
        let bytes = encode_pages(PageKind::Journal, pos.seq, batch, &encode_ops(ops), seed);
        push(pos.page, bytes, &mut out);
        used += pages;
        pos = JournalPos { seq: pos.seq + 1, page: (pos.page + pages) % ring };
    }
    (used <= free).then_some((out, pos, used))
}

/// What replay found.
#[derive(Debug)]
pub(crate) struct Replayed {
    /// Where the next record goes.
    pub tail: JournalPos,
    /// Records applied.
    pub records: u64,
    /// Why replay stopped, for the log.
    pub stopped: String,
}

/// Why replay refused the journal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ReplayError {
    /// Ring page where the problem is.
    pub page: u64,
    /// What is wrong.
    pub reason: String,
}

/// Replays the ring (all `ring.len() / PAGE_SIZE` pages) into `state` from `from`.
pub(crate) fn replay(ring: &[u8], from: JournalPos, seed: Seed, state: &mut State) -> Result<Replayed, ReplayError> {
    let n = (ring.len() / PAGE_SIZE) as u64;
    let page = |i: u64| &ring[(i as usize) * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE];
    let mut pos = from;
    let mut records = 0u64;
    let mut walked = 0u64;
    let stopped = loop {
        if walked > n {
            return Err(ReplayError { page: pos.page, reason: "the journal never ends: record numbers loop".into() });
        }
        let (h, _) = match decode_page(page(pos.page), seed) {
            Ok(x) => x,
            Err(e) => break format!("page {}: {e}", pos.page),
        };
        if h.seq != pos.seq {
            if h.seq > pos.seq && h.kind != PageKind::Checkpoint {
                return Err(ReplayError {
                    page: pos.page,
                    reason: format!("record {} where record {} should be", h.seq, pos.seq),
                });
            }
            break format!("page {}: record {} of an earlier lap", pos.page, h.seq);
        }
        if h.index != 0 {
            return Err(ReplayError {
                page: pos.page,
                reason: format!("record {} starts at its page {}", h.seq, h.index),
            });
        }
        match h.kind {
            PageKind::JournalWrap => {
                walked += n - pos.page;
                pos = JournalPos { seq: pos.seq + 1, page: 0 };
                continue;
            }
            PageKind::Journal => {}
            other => {
                return Err(ReplayError { page: pos.page, reason: format!("a {other:?} page inside the journal") });
            }
        }
        let count = h.count as u64;
        if pos.page + count > n {
            return Err(ReplayError {
                page: pos.page,
                reason: format!("record {} of {count} pages runs past the end of the ring", h.seq),
            });
        }
        let mut payload = Vec::new();
        let mut torn = None;
        for i in 0..count {
            match decode_page(page(pos.page + i), seed) {
                Ok((p, body))
                    if p.kind == PageKind::Journal && p.seq == h.seq && p.index as u64 == i && p.count == h.count =>
                {
                    payload.extend_from_slice(body)
                }
                Ok(_) => {
                    torn = Some(format!("page {}: not page {i} of record {}", pos.page + i, h.seq));
                    break;
                }
                Err(e) => {
                    torn = Some(format!("page {}: {e}", pos.page + i));
                    break;
                }
            }
        }
        if let Some(t) = torn {
            break t;
        }
        let ops = decode_ops(&payload, state.geometry.num_clusters)
            .map_err(|e| ReplayError { page: pos.page, reason: format!("record {} does not decode: {e}", h.seq) })?;
        for op in &ops {
            state
                .apply(op)
                .map_err(|ApplyError(e)| ReplayError { page: pos.page, reason: format!("record {}: {e}", h.seq) })?;
        }
        records += 1;
        walked += count;
        pos = JournalPos { seq: pos.seq + 1, page: (pos.page + count) % n };
    };
    // Replay stopped: a torn last batch, or damage with later batches after it?
    for i in 0..n {
        if let Ok((h, _)) = decode_page(page(i), seed) {
            if matches!(h.kind, PageKind::Journal | PageKind::JournalWrap) && h.aux > pos.seq {
                return Err(ReplayError {
                    page: pos.page,
                    reason: format!(
                        "record {} is missing or damaged ({stopped}) but a later write (records from {}, page {i}) is intact",
                        pos.seq, h.aux
                    ),
                });
            }
        }
    }
    Ok(Replayed { tail: pos, records, stopped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BlobMd, Geometry};

    const RING: u64 = 16;

    fn state() -> State {
        State::empty(Geometry {
            cluster_size: 1 << 16,
            block_size: 4096,
            num_clusters: 64,
            journal_start: 2,
            journal_pages: RING,
            md_clusters: 2,
        })
    }

    fn put(id: u64, clusters: Vec<u64>) -> Vec<Op> {
        vec![Op::PutBlob(BlobMd { id, clusters, ..Default::default() })]
    }

    fn big(id: u64) -> Vec<Op> {
        let xattrs = [("a".to_string(), vec![7u8; 6000])].into();
        vec![Op::PutBlob(BlobMd { id, xattrs, ..Default::default() })]
    }

    fn write(ring: &mut [u8], placements: &[Placement]) {
        for p in placements {
            let at = p.page as usize * PAGE_SIZE;
            ring[at..at + p.bytes.len()].copy_from_slice(&p.bytes);
        }
    }

    fn seed() -> Seed {
        Seed::of(&[3; 16])
    }

    #[test]
    fn records_replay_across_batches_and_the_ring_end() {
        let mut ring = vec![0u8; RING as usize * PAGE_SIZE];
        let mut tail = JournalPos { seq: 1, page: 10 };
        let (p, t, used) = layout(&[put(1, vec![2]), big(2)], tail, RING, RING - 1, seed()).unwrap();
        assert_eq!(used, 3);
        write(&mut ring, &p);
        tail = t;
        // 3 pages left before the end: a 2-page record fits, the next 2-page one
        // wraps (a marker, record 4, on the last page), then continues at page 0.
        let (p, t, used) = layout(&[big(3), big(4)], tail, RING, RING - 1 - 3, seed()).unwrap();
        assert_eq!(used, 2 + 1 + 2, "the skipped last page counts");
        assert_eq!(t, JournalPos { seq: 6, page: 2 });
        assert_eq!(p.iter().map(|x| x.page).collect::<Vec<_>>(), vec![13, 0]);
        write(&mut ring, &p);
        let mut s = state();
        let r = replay(&ring, JournalPos { seq: 1, page: 10 }, seed(), &mut s).unwrap();
        assert_eq!((r.tail, r.records), (JournalPos { seq: 6, page: 2 }, 4));
        assert_eq!(s.blobs.len(), 4);
        assert!(s.bitmap.get(2));
    }

    #[test]
    fn a_full_ring_refuses_a_batch() {
        assert!(layout(&[big(1)], JournalPos { seq: 1, page: 0 }, RING, 1, seed()).is_none());
        assert!(layout(&[vec![Op::DeleteBlob(1)]; 1], JournalPos { seq: 1, page: 0 }, 1, 1, seed()).is_none());
    }

    #[test]
    fn a_torn_last_batch_is_the_end_of_the_log() {
        let mut ring = vec![0u8; RING as usize * PAGE_SIZE];
        let (p, t, _) = layout(&[put(1, vec![])], JournalPos { seq: 1, page: 0 }, RING, 15, seed()).unwrap();
        write(&mut ring, &p);
        let (p, _, _) = layout(&[big(2), put(3, vec![])], t, RING, 14, seed()).unwrap();
        write(&mut ring, &p);
        // The power went while writing the second batch: its first page is torn,
        // its last page made it. Record 3 was never acknowledged.
        ring[PAGE_SIZE + 100] ^= 1;
        let mut s = state();
        let r = replay(&ring, JournalPos { seq: 1, page: 0 }, seed(), &mut s).unwrap();
        assert_eq!((r.tail, r.records), (JournalPos { seq: 2, page: 1 }, 1));
        assert!(r.stopped.contains("checksum"), "{}", r.stopped);
        assert_eq!(s.blobs.keys().copied().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn damage_followed_by_a_later_batch_is_corruption() {
        let mut ring = vec![0u8; RING as usize * PAGE_SIZE];
        let mut tail = JournalPos { seq: 1, page: 0 };
        for id in 1..=3 {
            let (p, t, _) = layout(&[put(id, vec![])], tail, RING, 15, seed()).unwrap();
            write(&mut ring, &p);
            tail = t;
        }
        ring[PAGE_SIZE + 7] ^= 0x80; // record 2, a batch of its own; record 3 came after
        let err = replay(&ring, JournalPos { seq: 1, page: 0 }, seed(), &mut state()).unwrap_err();
        assert_eq!(err.page, 1);
        assert!(
            err.reason.contains("record 2 is missing or damaged") && err.reason.contains("later write"),
            "{}",
            err.reason
        );
    }

    #[test]
    fn impossible_records_are_corruption_with_their_place() {
        let mut ring = vec![0u8; RING as usize * PAGE_SIZE];
        let (p, _, _) =
            layout(&[put(1, vec![5]), put(2, vec![5])], JournalPos { seq: 1, page: 0 }, RING, 15, seed()).unwrap();
        write(&mut ring, &p);
        let err = replay(&ring, JournalPos { seq: 1, page: 0 }, seed(), &mut state()).unwrap_err();
        assert_eq!(err.page, 1);
        assert!(err.reason.contains("record 2: blob 2 claims cluster 5, which is already in use"), "{}", err.reason);
    }

    #[test]
    fn pages_of_an_earlier_lap_or_another_store_end_the_log() {
        let mut ring = vec![0u8; RING as usize * PAGE_SIZE];
        let (p, _, _) =
            layout(&[put(1, vec![])], JournalPos { seq: 40, page: 3 }, RING, 15, Seed::of(&[9; 16])).unwrap();
        write(&mut ring, &p);
        let r = replay(&ring, JournalPos { seq: 40, page: 3 }, seed(), &mut state()).unwrap();
        assert_eq!(r.records, 0, "another store's record does not check");
        let (p, _, _) = layout(&[put(1, vec![])], JournalPos { seq: 2, page: 3 }, RING, 15, seed()).unwrap();
        write(&mut ring, &p);
        let r = replay(&ring, JournalPos { seq: 40, page: 3 }, seed(), &mut state()).unwrap();
        assert!(r.stopped.contains("earlier lap"), "{}", r.stopped);
    }
}
