//! The payloads of metadata pages: the super block, blob metadata, journal
//! records and the checkpoint stream. Encoding is little-endian, field by
//! field (docs/blobfs.md lists every field). Decoding checks structure and
//! bounds and refuses impossible values with a message naming the field;
//! checks that need the whole store (a cluster owned twice) are the state's.

use std::collections::BTreeMap;

use super::codec::{DecodeError, Reader, Writer};

/// Longest xattr name in bytes.
pub const MAX_XATTR_NAME: usize = 255;
/// Largest xattr value in bytes.
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Largest total of names and values of one blob's xattrs.
pub const MAX_XATTRS_TOTAL: usize = 256 << 10;
/// How many times the store's clusters a blob may span (thin provisioning
/// may overcommit the device up to this factor).
pub const MAX_OVERCOMMIT: u64 = 16;
/// Most extents a super block lists for one checkpoint.
pub const MAX_CHECKPOINT_EXTENTS: usize = 64;

/// Blob flag: clusters are allocated on first write.
pub const FLAG_THIN: u32 = 1;
/// Blob flag: writes are refused.
pub const FLAG_READ_ONLY: u32 = 2;
/// Blob flag: a snapshot (read-only; clones may depend on it).
pub const FLAG_SNAPSHOT: u32 = 4;
/// Blob flag: clusters the blob gets are not zeroed first. For an owner that
/// never reads what it did not write (a pool it maps itself); anyone else
/// would read what the cluster held before.
pub const FLAG_NO_ZERO: u32 = 8;
const KNOWN_FLAGS: u32 = FLAG_THIN | FLAG_READ_ONLY | FLAG_SNAPSHOT | FLAG_NO_ZERO;

fn bad(msg: String) -> DecodeError {
    DecodeError(msg)
}

/// Sizes and places fixed at format time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per cluster (a multiple of the page size).
    pub cluster_size: u32,
    /// The bdev's block size when formatted.
    pub block_size: u32,
    /// Clusters in the store, metadata clusters included.
    pub num_clusters: u64,
    /// First page of the journal ring.
    pub journal_start: u64,
    /// Pages in the journal ring.
    pub journal_pages: u64,
    /// Clusters holding the super blocks and the journal (never allocated to blobs).
    pub md_clusters: u64,
}

impl Geometry {
    /// Pages per cluster.
    pub fn pages_per_cluster(&self) -> u64 {
        self.cluster_size as u64 / super::PAGE_SIZE as u64
    }

    fn encode(&self, w: &mut Writer) {
        w.u32(self.cluster_size);
        w.u32(self.block_size);
        w.u64(self.num_clusters);
        w.u64(self.journal_start);
        w.u64(self.journal_pages);
        w.u64(self.md_clusters);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let g = Geometry {
            cluster_size: r.u32("cluster size")?,
            block_size: r.u32("block size")?,
            num_clusters: r.u64("cluster count")?,
            journal_start: r.u64("journal start")?,
            journal_pages: r.u64("journal size")?,
            md_clusters: r.u64("metadata clusters")?,
        };
        let page = super::PAGE_SIZE as u32;
        if g.cluster_size < page || g.cluster_size % page != 0 || !g.cluster_size.is_power_of_two() {
            return Err(bad(format!(
                "cluster size {} is not a power-of-two multiple of the page size",
                g.cluster_size
            )));
        }
        if !(512..=page).contains(&g.block_size) || !g.block_size.is_power_of_two() {
            return Err(bad(format!("block size {} is not a power of two from 512 to 4096", g.block_size)));
        }
        if g.journal_start < 2 || g.journal_pages < 4 {
            return Err(bad(format!(
                "journal at page {} with {} pages is impossible",
                g.journal_start, g.journal_pages
            )));
        }
        let md_pages = g.md_clusters.checked_mul(g.pages_per_cluster());
        if md_pages.is_none_or(|p| p < g.journal_start + g.journal_pages) || g.md_clusters >= g.num_clusters {
            return Err(bad(format!(
                "{} metadata clusters cannot hold the journal or leave no data cluster",
                g.md_clusters
            )));
        }
        Ok(g)
    }
}

/// Where a checkpoint is: its generation, its length, its clusters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointRef {
    /// Generation (the `seq` of its pages).
    pub generation: u64,
    /// Pages it fills.
    pub pages: u64,
    /// Runs of clusters holding the pages in order: (first cluster, clusters).
    pub extents: Vec<(u64, u64)>,
}

impl CheckpointRef {
    fn encode(&self, w: &mut Writer) {
        w.u64(self.generation);
        w.u64(self.pages);
        w.u32(self.extents.len() as u32);
        for &(start, len) in &self.extents {
            w.u64(start);
            w.u64(len);
        }
    }

    fn decode(r: &mut Reader<'_>, g: &Geometry) -> Result<Self, DecodeError> {
        let generation = r.u64("checkpoint generation")?;
        let pages = r.u64("checkpoint pages")?;
        let n = r.u32("checkpoint extent count")? as usize;
        if n > MAX_CHECKPOINT_EXTENTS {
            return Err(bad(format!("{n} checkpoint extents (at most {MAX_CHECKPOINT_EXTENTS})")));
        }
        let mut extents = Vec::with_capacity(n);
        let mut clusters = 0u64;
        for _ in 0..n {
            let (start, len) = (r.u64("checkpoint extent start")?, r.u64("checkpoint extent length")?);
            if start < g.md_clusters || start.checked_add(len).is_none_or(|e| e > g.num_clusters) || len == 0 {
                return Err(bad(format!("checkpoint extent {start}+{len} lies outside the data clusters")));
            }
            clusters += len;
            extents.push((start, len));
        }
        if pages > clusters.saturating_mul(g.pages_per_cluster()) {
            return Err(bad(format!("checkpoint of {pages} pages does not fit its {clusters} clusters")));
        }
        Ok(Self { generation, pages, extents })
    }

    /// The pages of the checkpoint as device page numbers, in order.
    pub fn page_numbers(&self, g: &Geometry) -> impl Iterator<Item = u64> + '_ {
        let ppc = g.pages_per_cluster();
        self.extents.iter().flat_map(move |&(start, len)| start * ppc..(start + len) * ppc).take(self.pages as usize)
    }
}

/// A position in the journal: the next record number and the page it starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JournalPos {
    /// Number of the record expected there.
    pub seq: u64,
    /// Page within the ring.
    pub page: u64,
}

/// The super block (two copies, pages 0 and 1; the valid one with the higher
/// commit number wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperBlock {
    /// Identity of the store; seeds every other page's checksum.
    pub uuid: [u8; 16],
    /// Fixed sizes and places.
    pub geometry: Geometry,
    /// Unloaded cleanly: the journal holds nothing after `replay`.
    pub clean: bool,
    /// The current checkpoint.
    pub checkpoint: CheckpointRef,
    /// The checkpoint before it, kept until the next one commits (so that the
    /// other super block copy stays usable if this one's write is torn).
    pub previous: Option<CheckpointRef>,
    /// Where replay starts after the current checkpoint.
    pub replay: JournalPos,
}

impl SuperBlock {
    /// The payload of a super page.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&self.uuid);
        self.geometry.encode(&mut w);
        w.u8(self.clean as u8);
        self.checkpoint.encode(&mut w);
        match &self.previous {
            Some(p) => {
                w.u8(1);
                p.encode(&mut w);
            }
            None => w.u8(0),
        }
        w.u64(self.replay.seq);
        w.u64(self.replay.page);
        w.into_inner()
    }

    /// Decodes a super page's payload.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let uuid: [u8; 16] = r.take(16, "uuid")?.try_into().expect("16 bytes");
        let geometry = Geometry::decode(&mut r)?;
        let clean = match r.u8("clean flag")? {
            0 => false,
            1 => true,
            v => return Err(bad(format!("clean flag {v} is neither 0 nor 1"))),
        };
        let checkpoint = CheckpointRef::decode(&mut r, &geometry)?;
        let previous = match r.u8("previous checkpoint flag")? {
            0 => None,
            1 => Some(CheckpointRef::decode(&mut r, &geometry)?),
            v => return Err(bad(format!("previous checkpoint flag {v} is neither 0 nor 1"))),
        };
        let replay = JournalPos { seq: r.u64("replay record")?, page: r.u64("replay page")? };
        if replay.page >= geometry.journal_pages {
            return Err(bad(format!(
                "replay page {} is beyond the {}-page journal",
                replay.page, geometry.journal_pages
            )));
        }
        Ok(Self { uuid, geometry, clean, checkpoint, previous, replay })
    }
}

/// The metadata of one blob.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlobMd {
    /// Identifier (never 0, never reused).
    pub id: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// The blob reads unallocated clusters through (a snapshot), if any.
    pub parent: Option<u64>,
    /// Physical cluster per logical cluster; 0 means not allocated (cluster 0
    /// holds the super blocks, so it is never a data cluster).
    pub clusters: Vec<u64>,
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Incremented by every sync.
    pub md_seq: u64,
}

impl BlobMd {
    /// Whether a flag is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Clusters allocated to this blob.
    pub fn allocated(&self) -> impl Iterator<Item = u64> + '_ {
        self.clusters.iter().copied().filter(|&c| c != 0)
    }

    /// Runs of consecutive logical clusters mapped to consecutive physical clusters.
    fn extents(&self) -> Vec<(u64, u64, u64)> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        for (i, &p) in self.clusters.iter().enumerate() {
            if p == 0 {
                continue;
            }
            match out.last_mut() {
                Some((l, ph, n)) if *l + *n == i as u64 && *ph + *n == p => *n += 1,
                _ => out.push((i as u64, p, 1)),
            }
        }
        out
    }

    /// Appends the encoding.
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u64(self.id);
        w.u32(self.flags);
        w.u64(self.parent.unwrap_or(0));
        w.u64(self.md_seq);
        w.u64(self.clusters.len() as u64);
        let extents = self.extents();
        w.u32(extents.len() as u32);
        for (l, p, n) in extents {
            w.u64(l);
            w.u64(p);
            w.u64(n);
        }
        w.u32(self.xattrs.len() as u32);
        for (k, v) in &self.xattrs {
            w.u16(k.len() as u16);
            w.bytes(k.as_bytes());
            w.u32(v.len() as u32);
            w.bytes(v);
        }
    }

    /// Decodes one blob, checking bounds against a store of `num_clusters`.
    pub(crate) fn decode(r: &mut Reader<'_>, num_clusters: u64) -> Result<Self, DecodeError> {
        let id = r.u64("blob id")?;
        if id == 0 {
            return Err(bad("blob id 0".into()));
        }
        let flags = r.u32("blob flags")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("blob {id}: unknown flags {:#x}", flags & !KNOWN_FLAGS)));
        }
        let parent = match r.u64("blob parent")? {
            0 => None,
            p if p == id => return Err(bad(format!("blob {id} is its own parent"))),
            p => Some(p),
        };
        let md_seq = r.u64("blob md_seq")?;
        let size = r.u64("blob size")?;
        if size > num_clusters.saturating_mul(MAX_OVERCOMMIT) {
            return Err(bad(format!("blob {id}: size of {size} clusters is impossible in a store of {num_clusters}")));
        }
        let mut clusters = vec![0u64; size as usize];
        let n = r.u32("extent count")?;
        if n as usize > r.remaining() / 24 {
            return Err(bad(format!("blob {id}: {n} extents cannot fit the record")));
        }
        let mut next_logical = 0u64;
        for _ in 0..n {
            let (l, p, len) = (r.u64("extent start")?, r.u64("extent cluster")?, r.u64("extent length")?);
            if len == 0 || l < next_logical || l.checked_add(len).is_none_or(|e| e > size) {
                return Err(bad(format!(
                    "blob {id}: extent {l}+{len} overlaps another or lies beyond {size} clusters"
                )));
            }
            if p == 0 || p.checked_add(len).is_none_or(|e| e > num_clusters) {
                return Err(bad(format!("blob {id}: extent at cluster {p}+{len} lies outside the store")));
            }
            for i in 0..len {
                clusters[(l + i) as usize] = p + i;
            }
            next_logical = l + len;
        }
        let nx = r.u32("xattr count")?;
        let mut xattrs = BTreeMap::new();
        let mut total = 0usize;
        for _ in 0..nx {
            let kl = r.u16("xattr name length")? as usize;
            let k = r.take(kl, "xattr name")?;
            let name = std::str::from_utf8(k).map_err(|_| bad(format!("blob {id}: xattr name is not UTF-8")))?;
            check_xattr_name(name).map_err(|e| bad(format!("blob {id}: {e}")))?;
            let vl = r.u32("xattr value length")? as usize;
            if vl > MAX_XATTR_VALUE {
                return Err(bad(format!("blob {id}: xattr {name:?} value of {vl} bytes")));
            }
            let v = r.take(vl, "xattr value")?;
            total += kl + vl;
            if total > MAX_XATTRS_TOTAL {
                return Err(bad(format!("blob {id}: xattrs exceed {MAX_XATTRS_TOTAL} bytes")));
            }
            xattrs.insert(name.to_string(), v.to_vec());
        }
        Ok(BlobMd { id, flags, parent, clusters, xattrs, md_seq })
    }
}

/// Checks an xattr name: 1 to 255 bytes, no NUL.
pub fn check_xattr_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains('\0') {
        return Err(format!("xattr name {name:?} must be 1 to {MAX_XATTR_NAME} bytes without NUL"));
    }
    Ok(())
}

/// One change in a journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A blob's whole metadata (created, synced, snapshotted, cloned...).
    PutBlob(BlobMd),
    /// A blob is gone; its clusters are free.
    DeleteBlob(u64),
    /// Logical cluster `index` of `blob` is now physical cluster `phys` (a
    /// first write to a thin blob or a clone).
    Alloc {
        /// The blob.
        blob: u64,
        /// Logical cluster.
        index: u64,
        /// Physical cluster.
        phys: u64,
    },
    /// The super blob (the application's root), or none.
    SetSuper(Option<u64>),
    /// A snapshot takes over the clusters of its origin, which becomes a thin
    /// clone of it: both blobs' new metadata in one op.
    Snapshot {
        /// The new snapshot (owning the origin's clusters).
        snapshot: BlobMd,
        /// The origin after the snapshot (no clusters of its own, parent = snapshot).
        origin: BlobMd,
    },
}

/// Encodes the ops of one record.
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(ops.len() as u32);
    for op in ops {
        match op {
            Op::PutBlob(md) => {
                w.u8(1);
                md.encode(&mut w);
            }
            Op::DeleteBlob(id) => {
                w.u8(2);
                w.u64(*id);
            }
            Op::Alloc { blob, index, phys } => {
                w.u8(3);
                w.u64(*blob);
                w.u64(*index);
                w.u64(*phys);
            }
            Op::SetSuper(id) => {
                w.u8(4);
                w.u64(id.unwrap_or(0));
            }
            Op::Snapshot { snapshot, origin } => {
                w.u8(5);
                snapshot.encode(&mut w);
                origin.encode(&mut w);
            }
        }
    }
    w.into_inner()
}

/// Decodes the ops of one record.
pub fn decode_ops(payload: &[u8], num_clusters: u64) -> Result<Vec<Op>, DecodeError> {
    let mut r = Reader::new(payload);
    let n = r.u32("op count")? as usize;
    if n > payload.len() {
        return Err(bad(format!("{n} ops cannot fit a {}-byte record", payload.len())));
    }
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        ops.push(match r.u8("op tag")? {
            1 => Op::PutBlob(BlobMd::decode(&mut r, num_clusters)?),
            2 => Op::DeleteBlob(r.u64("deleted blob")?),
            3 => {
                let (blob, index, phys) = (r.u64("alloc blob")?, r.u64("alloc index")?, r.u64("alloc cluster")?);
                if phys == 0 || phys >= num_clusters {
                    return Err(bad(format!("allocation of cluster {phys} outside the store")));
                }
                Op::Alloc { blob, index, phys }
            }
            4 => Op::SetSuper(match r.u64("super blob")? {
                0 => None,
                id => Some(id),
            }),
            5 => Op::Snapshot {
                snapshot: BlobMd::decode(&mut r, num_clusters)?,
                origin: BlobMd::decode(&mut r, num_clusters)?,
            },
            t => return Err(bad(format!("unknown op tag {t}"))),
        });
    }
    if r.remaining() != 0 {
        return Err(bad(format!("{} bytes after the last op", r.remaining())));
    }
    Ok(ops)
}

/// What a checkpoint holds besides its blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// Generation (also the `seq` of its pages).
    pub generation: u64,
    /// The journal position replay starts from.
    pub replay: JournalPos,
    /// The id the next new blob gets.
    pub next_blob_id: u64,
    /// The super blob.
    pub super_blob: Option<u64>,
}

/// Encodes a checkpoint: header, allocation bitmap (one bit per cluster, set =
/// in use), blobs.
pub fn encode_checkpoint<'a>(
    header: &CheckpointHeader,
    bitmap: &[u64],
    num_clusters: u64,
    blobs: impl ExactSizeIterator<Item = &'a BlobMd>,
) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(header.generation);
    w.u64(header.replay.seq);
    w.u64(header.replay.page);
    w.u64(header.next_blob_id);
    w.u64(header.super_blob.unwrap_or(0));
    w.u64(num_clusters);
    w.u64(blobs.len() as u64);
    for word in bitmap.iter().take(num_clusters.div_ceil(64) as usize) {
        w.u64(*word);
    }
    for b in blobs {
        b.encode(&mut w);
    }
    w.into_inner()
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Header fields.
    pub header: CheckpointHeader,
    /// One bit per cluster, set = in use.
    pub bitmap: Vec<u64>,
    /// Every blob.
    pub blobs: Vec<BlobMd>,
}

/// Decodes a checkpoint of a store of `num_clusters`.
pub fn decode_checkpoint(payload: &[u8], num_clusters: u64) -> Result<Checkpoint, DecodeError> {
    let mut r = Reader::new(payload);
    let generation = r.u64("checkpoint generation")?;
    let replay = JournalPos { seq: r.u64("replay record")?, page: r.u64("replay page")? };
    let next_blob_id = r.u64("next blob id")?;
    let super_blob = match r.u64("super blob")? {
        0 => None,
        id => Some(id),
    };
    let n = r.u64("cluster count")?;
    if n != num_clusters {
        return Err(bad(format!("checkpoint is for {n} clusters, the store has {num_clusters}")));
    }
    let blobs_n = r.u64("blob count")?;
    let words = num_clusters.div_ceil(64) as usize;
    if words > r.remaining() / 8 {
        return Err(bad("allocation bitmap is cut short".into()));
    }
    let mut bitmap = Vec::with_capacity(words);
    for _ in 0..words {
        bitmap.push(r.u64("bitmap word")?);
    }
    if blobs_n > r.remaining() as u64 / 44 {
        return Err(bad(format!("{blobs_n} blobs cannot fit the checkpoint")));
    }
    let mut blobs = Vec::with_capacity(blobs_n as usize);
    for _ in 0..blobs_n {
        blobs.push(BlobMd::decode(&mut r, num_clusters)?);
    }
    if r.remaining() != 0 {
        return Err(bad(format!("{} bytes after the last blob", r.remaining())));
    }
    Ok(Checkpoint { header: CheckpointHeader { generation, replay, next_blob_id, super_blob }, bitmap, blobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry {
            cluster_size: 1 << 20,
            block_size: 4096,
            num_clusters: 1024,
            journal_start: 2,
            journal_pages: 254,
            md_clusters: 1,
        }
    }

    fn blob() -> BlobMd {
        let mut md = BlobMd {
            id: 5,
            flags: FLAG_THIN,
            parent: Some(3),
            clusters: vec![0, 10, 11, 12, 0, 40],
            md_seq: 2,
            ..Default::default()
        };
        md.xattrs.insert("name".into(), b"root".to_vec());
        md.xattrs.insert("empty".into(), Vec::new());
        md
    }

    #[test]
    fn super_blocks_round_trip() {
        let sb = SuperBlock {
            uuid: [9; 16],
            geometry: geometry(),
            clean: true,
            checkpoint: CheckpointRef { generation: 4, pages: 3, extents: vec![(100, 1)] },
            previous: Some(CheckpointRef { generation: 3, pages: 300, extents: vec![(200, 1), (300, 1)] }),
            replay: JournalPos { seq: 77, page: 12 },
        };
        assert_eq!(SuperBlock::decode(&sb.encode()).unwrap(), sb);
        let pages: Vec<u64> = sb.previous.as_ref().unwrap().page_numbers(&sb.geometry).collect();
        assert_eq!(pages.len(), 300);
        assert_eq!((pages[0], pages[255], pages[256]), (200 * 256, 200 * 256 + 255, 300 * 256));
    }

    #[test]
    fn impossible_super_blocks_are_refused_by_name() {
        let mut sb = SuperBlock {
            uuid: [1; 16],
            geometry: geometry(),
            clean: false,
            checkpoint: CheckpointRef { generation: 1, pages: 1, extents: vec![(1, 1)] },
            previous: None,
            replay: JournalPos::default(),
        };
        sb.geometry.cluster_size = 5000;
        assert!(SuperBlock::decode(&sb.encode()).unwrap_err().0.contains("cluster size 5000"));
        sb.geometry = geometry();
        sb.checkpoint.extents = vec![(0, 1)];
        assert!(SuperBlock::decode(&sb.encode()).unwrap_err().0.contains("outside the data clusters"));
        sb.checkpoint.extents = vec![(1, 1)];
        sb.replay.page = 999;
        assert!(SuperBlock::decode(&sb.encode()).unwrap_err().0.contains("beyond the 254-page journal"));
    }

    #[test]
    fn blobs_and_ops_round_trip_with_extents_compressed() {
        let md = blob();
        assert_eq!(md.extents(), vec![(1, 10, 3), (5, 40, 1)]);
        let ops = vec![
            Op::PutBlob(md.clone()),
            Op::DeleteBlob(4),
            Op::Alloc { blob: 5, index: 4, phys: 41 },
            Op::SetSuper(Some(5)),
            Op::SetSuper(None),
            Op::Snapshot {
                snapshot: BlobMd { id: 9, ..md.clone() },
                origin: BlobMd { id: 5, parent: Some(9), ..Default::default() },
            },
        ];
        assert_eq!(decode_ops(&encode_ops(&ops), 1024).unwrap(), ops);
    }

    #[test]
    fn impossible_blobs_are_refused_by_name() {
        let mut md = blob();
        md.clusters[5] = 5000;
        let e = decode_ops(&encode_ops(&[Op::PutBlob(md)]), 1024).unwrap_err();
        assert!(e.0.contains("outside the store"), "{e}");
        let e = decode_ops(&encode_ops(&[Op::Alloc { blob: 1, index: 0, phys: 0 }]), 1024).unwrap_err();
        assert!(e.0.contains("cluster 0 outside"), "{e}");
        let mut bytes = encode_ops(&[Op::DeleteBlob(1)]);
        bytes.push(0);
        assert!(decode_ops(&bytes, 1024).unwrap_err().0.contains("1 bytes after the last op"));
        let mut bytes = encode_ops(&[Op::DeleteBlob(1)]);
        bytes[4] = 9;
        assert!(decode_ops(&bytes, 1024).unwrap_err().0.contains("unknown op tag 9"));
        let mut md = blob();
        md.flags = 64;
        assert!(decode_ops(&encode_ops(&[Op::PutBlob(md)]), 1024).unwrap_err().0.contains("unknown flags"));
    }

    #[test]
    fn checkpoints_round_trip() {
        let header = CheckpointHeader {
            generation: 7,
            replay: JournalPos { seq: 8, page: 9 },
            next_blob_id: 6,
            super_blob: Some(5),
        };
        let bitmap = vec![0b1011u64, 0, u64::MAX];
        let blobs = [blob()];
        let bytes = encode_checkpoint(&header, &bitmap, 130, blobs.iter());
        let ck = decode_checkpoint(&bytes, 130).unwrap();
        assert_eq!((ck.header, ck.bitmap, ck.blobs), (header, bitmap, blobs.to_vec()));
        assert!(decode_checkpoint(&bytes, 131).unwrap_err().0.contains("for 130 clusters"));
        assert!(decode_checkpoint(&bytes[..bytes.len() - 3], 130).is_err());
    }
}
