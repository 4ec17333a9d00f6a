//! The durable metadata of a store in memory: every blob as of its last
//! durable record, the allocation bitmap, the super blob.
//!
//! The same [`State::apply`] runs when a journal record is replayed at load
//! and when a record has been written at run time, so the state in memory is
//! always exactly what a load would rebuild. Every op checks the invariants
//! (a cluster is free before it is claimed, a blob exists before it changes);
//! an op that breaks one is reported, never half applied.

use std::collections::BTreeMap;

use crate::format::{BlobMd, Checkpoint, CheckpointRef, Geometry, Op};

/// One bit per cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    set: u64,
}

impl Bitmap {
    /// All clear.
    pub fn new(len: u64) -> Self {
        Self { words: vec![0; len.div_ceil(64) as usize], len, set: 0 }
    }

    /// From stored words (bits beyond `len` must be clear).
    pub fn from_words(words: Vec<u64>, len: u64) -> Result<Self, String> {
        if words.len() as u64 != len.div_ceil(64) {
            return Err(format!("bitmap of {} words for {len} clusters", words.len()));
        }
        if len % 64 != 0 && words.last().is_some_and(|w| w >> (len % 64) != 0) {
            return Err(format!("bits set beyond cluster {len}"));
        }
        let set = words.iter().map(|w| w.count_ones() as u64).sum();
        Ok(Self { words, len, set })
    }

    /// The words, for a checkpoint.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true for a store.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns false if it was set already.
    pub fn set(&mut self, i: u64) -> bool {
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        if *w & m != 0 {
            return false;
        }
        *w |= m;
        self.set += 1;
        true
    }

    /// Clears bit `i`; returns false if it was clear already.
    pub fn clear(&mut self, i: u64) -> bool {
        let w = &mut self.words[(i / 64) as usize];
        let m = 1 << (i % 64);
        if *w & m == 0 {
            return false;
        }
        *w &= !m;
        self.set -= 1;
        true
    }

    /// The first clear bit at or after `from` (wrapping), if any.
    pub fn find_clear(&self, from: u64) -> Option<u64> {
        if self.set == self.len {
            return None;
        }
        let from = from.min(self.len.saturating_sub(1));
        let start = (from / 64) as usize;
        let n = self.words.len();
        for k in 0..=n {
            let wi = (start + k) % n;
            let mut free = !self.words[wi];
            if k == 0 {
                free &= u64::MAX << (from % 64); // skip the bits before `from`
            }
            if free != 0 {
                let bit = wi as u64 * 64 + free.trailing_zeros() as u64;
                if bit < self.len {
                    return Some(bit);
                }
            }
        }
        None
    }

    /// The start of the first run of `n` clear bits, if any.
    pub fn find_clear_run(&self, n: u64) -> Option<u64> {
        let mut run = 0;
        let mut i = 0;
        while i < self.len {
            if self.words[(i / 64) as usize] == u64::MAX && i % 64 == 0 {
                run = 0;
                i += 64;
                continue;
            }
            if self.get(i) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(i + 1 - n);
                }
            }
            i += 1;
        }
        None
    }
}

/// A record op that cannot apply: a sign of corruption (or of a bug).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ApplyError(pub String);

/// The durable metadata of a store.
#[derive(Debug, Clone)]
pub struct State {
    /// Sizes and places.
    pub geometry: Geometry,
    /// Every blob, as of its last durable record.
    pub blobs: BTreeMap<u64, BlobMd>,
    /// Clusters in use: metadata clusters, blob clusters, checkpoint clusters.
    pub bitmap: Bitmap,
    /// The id the next new blob gets.
    pub next_blob_id: u64,
    /// The application's root blob.
    pub super_blob: Option<u64>,
}

impl State {
    /// The state of a freshly formatted store (no blobs).
    pub fn empty(geometry: Geometry) -> Self {
        let mut bitmap = Bitmap::new(geometry.num_clusters);
        for c in 0..geometry.md_clusters {
            bitmap.set(c);
        }
        Self { geometry, blobs: BTreeMap::new(), bitmap, next_blob_id: 1, super_blob: None }
    }

    /// The state a checkpoint holds.
    pub fn from_checkpoint(geometry: Geometry, ck: Checkpoint) -> Result<Self, ApplyError> {
        let bitmap = Bitmap::from_words(ck.bitmap, geometry.num_clusters).map_err(ApplyError)?;
        let mut blobs = BTreeMap::new();
        for b in ck.blobs {
            if b.id >= ck.header.next_blob_id {
                return Err(ApplyError(format!("blob {} is not below the next id {}", b.id, ck.header.next_blob_id)));
            }
            if let Some(old) = blobs.insert(b.id, b) {
                return Err(ApplyError(format!("blob {} appears twice", old.id)));
            }
        }
        Ok(Self { geometry, blobs, bitmap, next_blob_id: ck.header.next_blob_id, super_blob: ck.header.super_blob })
    }

    fn claim(&mut self, blob: u64, cluster: u64) -> Result<(), ApplyError> {
        if cluster < self.geometry.md_clusters || cluster >= self.geometry.num_clusters {
            return Err(ApplyError(format!("blob {blob} claims cluster {cluster}, outside the data clusters")));
        }
        if !self.bitmap.set(cluster) {
            return Err(ApplyError(format!("blob {blob} claims cluster {cluster}, which is already in use")));
        }
        Ok(())
    }

    /// Applies one op. Returns the clusters it freed. On error nothing changed.
    pub fn apply(&mut self, op: &Op) -> Result<Vec<u64>, ApplyError> {
        match op {
            Op::PutBlob(md) => {
                if let Some(p) = md.parent {
                    if !self.blobs.contains_key(&p) {
                        return Err(ApplyError(format!("blob {} names parent {p}, which does not exist", md.id)));
                    }
                }
                let old: Vec<u64> = self.blobs.get(&md.id).map(|b| b.allocated().collect()).unwrap_or_default();
                let mut old_sorted = old.clone();
                old_sorted.sort_unstable();
                let new: Vec<u64> = md.allocated().collect();
                let mut new_sorted = new.clone();
                new_sorted.sort_unstable();
                if new_sorted.windows(2).any(|w| w[0] == w[1]) {
                    return Err(ApplyError(format!("blob {} maps one cluster twice", md.id)));
                }
                let added: Vec<u64> = new.iter().copied().filter(|c| old_sorted.binary_search(c).is_err()).collect();
                let freed: Vec<u64> = old.iter().copied().filter(|c| new_sorted.binary_search(c).is_err()).collect();
                for (i, &c) in added.iter().enumerate() {
                    if let Err(e) = self.claim(md.id, c) {
                        for &undo in &added[..i] {
                            self.bitmap.clear(undo);
                        }
                        return Err(e);
                    }
                }
                for &c in &freed {
                    self.bitmap.clear(c);
                }
                self.next_blob_id = self.next_blob_id.max(md.id + 1);
                self.blobs.insert(md.id, md.clone());
                Ok(freed)
            }
            Op::DeleteBlob(id) => {
                if self.blobs.values().any(|b| b.parent == Some(*id)) {
                    return Err(ApplyError(format!("blob {id} is deleted while another blob reads through it")));
                }
                let md = self
                    .blobs
                    .remove(id)
                    .ok_or_else(|| ApplyError(format!("deleting blob {id}, which does not exist")))?;
                let freed: Vec<u64> = md.allocated().collect();
                for &c in &freed {
                    self.bitmap.clear(c);
                }
                if self.super_blob == Some(*id) {
                    self.super_blob = None;
                }
                Ok(freed)
            }
            Op::Alloc { blob, index, phys } => {
                let size = match self.blobs.get(blob) {
                    None => return Err(ApplyError(format!("allocation for blob {blob}, which does not exist"))),
                    Some(b) => b.clusters.len() as u64,
                };
                if *index >= size {
                    return Err(ApplyError(format!("allocation of cluster {index} of blob {blob}, which has {size}")));
                }
                if self.blobs[blob].clusters[*index as usize] != 0 {
                    return Err(ApplyError(format!("cluster {index} of blob {blob} is allocated twice")));
                }
                self.claim(*blob, *phys)?;
                self.blobs.get_mut(blob).expect("checked above").clusters[*index as usize] = *phys;
                Ok(Vec::new())
            }
            Op::Snapshot { snapshot, origin } => {
                let old = self
                    .blobs
                    .get(&origin.id)
                    .ok_or_else(|| ApplyError(format!("snapshot of blob {}, which does not exist", origin.id)))?;
                if self.blobs.contains_key(&snapshot.id) {
                    return Err(ApplyError(format!("snapshot id {} is already a blob", snapshot.id)));
                }
                let mut had: Vec<u64> = old.allocated().collect();
                let mut takes: Vec<u64> = snapshot.allocated().collect();
                had.sort_unstable();
                takes.sort_unstable();
                if had != takes || origin.allocated().next().is_some() {
                    return Err(ApplyError(format!(
                        "snapshot {} must take over exactly the clusters of blob {}",
                        snapshot.id, origin.id
                    )));
                }
                if origin.parent != Some(snapshot.id) || snapshot.parent != old.parent {
                    return Err(ApplyError(format!(
                        "snapshot {} of blob {} links the wrong parents",
                        snapshot.id, origin.id
                    )));
                }
                self.next_blob_id = self.next_blob_id.max(snapshot.id + 1);
                self.blobs.insert(snapshot.id, snapshot.clone());
                self.blobs.insert(origin.id, origin.clone());
                Ok(Vec::new())
            }
            Op::SetSuper(id) => {
                if let Some(id) = id {
                    if !self.blobs.contains_key(id) {
                        return Err(ApplyError(format!("super blob {id} does not exist")));
                    }
                }
                self.super_blob = *id;
                Ok(Vec::new())
            }
        }
    }

    /// Checks the whole state: every cluster owned once, the bitmap equal to
    /// what is owned, parents present. `checkpoints` are the clusters of the
    /// checkpoints the super block keeps. Returns the problems found.
    pub fn check(&self, checkpoints: &[&CheckpointRef]) -> Vec<String> {
        let mut problems = Vec::new();
        let mut owner: Vec<u64> = vec![0; self.geometry.num_clusters as usize];
        const MD: u64 = u64::MAX;
        const CKPT: u64 = u64::MAX - 1;
        for c in 0..self.geometry.md_clusters {
            owner[c as usize] = MD;
        }
        for ck in checkpoints {
            for &(start, len) in &ck.extents {
                for c in start..start + len {
                    match owner.get(c as usize) {
                        Some(0) => owner[c as usize] = CKPT,
                        _ => problems.push(format!(
                            "checkpoint {} cluster {c} is owned twice or outside the store",
                            ck.generation
                        )),
                    }
                }
            }
        }
        for b in self.blobs.values() {
            if let Some(p) = b.parent {
                if !self.blobs.contains_key(&p) {
                    problems.push(format!("blob {} reads through blob {p}, which does not exist", b.id));
                }
            }
            for c in b.allocated() {
                match owner.get(c as usize) {
                    None => problems.push(format!("blob {} maps cluster {c}, outside the store", b.id)),
                    Some(0) => owner[c as usize] = b.id,
                    Some(&o) => {
                        let who = match o {
                            MD => "the metadata area".to_string(),
                            CKPT => "a checkpoint".to_string(),
                            id => format!("blob {id}"),
                        };
                        problems.push(format!("cluster {c} is owned by blob {} and by {who}", b.id));
                    }
                }
            }
        }
        let mut leaked = Vec::new();
        for (c, &o) in owner.iter().enumerate() {
            let used = self.bitmap.get(c as u64);
            if o != 0 && !used {
                problems.push(format!("cluster {c} is in use but marked free"));
            } else if o == 0 && used {
                leaked.push(c);
            }
        }
        if !leaked.is_empty() {
            let shown: Vec<String> = leaked.iter().take(10).map(|c| c.to_string()).collect();
            problems.push(format!(
                "{} clusters marked in use but owned by nothing (leaked): {}",
                leaked.len(),
                shown.join(", ")
            ));
        }
        if let Some(s) = self.super_blob {
            if !self.blobs.contains_key(&s) {
                problems.push(format!("super blob {s} does not exist"));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{FLAG_SNAPSHOT, FLAG_THIN};

    fn geometry() -> Geometry {
        Geometry {
            cluster_size: 1 << 20,
            block_size: 4096,
            num_clusters: 100,
            journal_start: 2,
            journal_pages: 200,
            md_clusters: 1,
        }
    }

    fn md(id: u64, clusters: Vec<u64>) -> BlobMd {
        BlobMd { id, clusters, ..Default::default() }
    }

    #[test]
    fn bitmap_finds_free_bits_and_runs() {
        let mut b = Bitmap::new(130);
        for i in 0..70 {
            b.set(i);
        }
        b.set(72);
        assert_eq!(b.find_clear(0), Some(70));
        assert_eq!(b.find_clear(73), Some(73));
        assert_eq!(b.find_clear_run(3), Some(73));
        assert_eq!(b.find_clear_run(58), None);
        assert_eq!(b.find_clear_run(57), Some(73));
        for i in 0..130 {
            b.set(i);
        }
        assert_eq!((b.find_clear(5), b.count()), (None, 130));
        assert!(Bitmap::from_words(vec![0, 1 << 5], 69).is_err(), "bit 69 set in a 69-bit map");
    }

    #[test]
    fn ops_keep_ownership_exact() {
        let mut s = State::empty(geometry());
        assert_eq!(s.bitmap.count(), 1);
        s.apply(&Op::PutBlob(md(1, vec![5, 6, 0]))).unwrap();
        s.apply(&Op::Alloc { blob: 1, index: 2, phys: 7 }).unwrap();
        let freed = s.apply(&Op::PutBlob(md(1, vec![5, 0, 7, 8]))).unwrap();
        assert_eq!(freed, vec![6]);
        assert_eq!(s.bitmap.count(), 4);
        let e = s.apply(&Op::PutBlob(md(2, vec![8]))).unwrap_err();
        assert!(e.0.contains("cluster 8, which is already in use"), "{e}");
        let e = s.apply(&Op::PutBlob(md(2, vec![9, 0, 8]))).unwrap_err();
        assert!(e.0.contains("already in use"));
        assert!(!s.bitmap.get(9), "a refused op leaves nothing claimed");
        assert!(s.apply(&Op::Alloc { blob: 1, index: 0, phys: 9 }).unwrap_err().0.contains("allocated twice"));
        assert!(s.apply(&Op::Alloc { blob: 1, index: 9, phys: 9 }).is_err());
        assert!(s.apply(&Op::PutBlob(md(3, vec![0]))).is_ok());
        assert!(
            s.apply(&Op::PutBlob(BlobMd { parent: Some(44), ..md(4, vec![]) })).unwrap_err().0.contains("parent 44")
        );
        assert_eq!(s.apply(&Op::DeleteBlob(1)).unwrap(), vec![5, 7, 8]);
        assert_eq!(s.bitmap.count(), 1);
        assert!(s.apply(&Op::DeleteBlob(1)).is_err());
        assert_eq!(s.next_blob_id, 4);
        assert!(s.check(&[]).is_empty());
    }

    #[test]
    fn a_snapshot_takes_over_exactly_its_origins_clusters() {
        let mut s = State::empty(geometry());
        s.apply(&Op::PutBlob(md(1, vec![3, 0, 4]))).unwrap();
        let snap = BlobMd { flags: FLAG_SNAPSHOT, ..md(2, vec![3, 0, 4]) };
        let origin = BlobMd { flags: FLAG_THIN, parent: Some(2), ..md(1, vec![0, 0, 0]) };
        let wrong = BlobMd { clusters: vec![3, 0, 0], ..snap.clone() };
        assert!(
            s.apply(&Op::Snapshot { snapshot: wrong, origin: origin.clone() })
                .unwrap_err()
                .0
                .contains("exactly the clusters")
        );
        s.apply(&Op::Snapshot { snapshot: snap, origin }).unwrap();
        assert_eq!(s.bitmap.count(), 3);
        assert_eq!(s.blobs[&1].parent, Some(2));
        assert!(s.check(&[]).is_empty());
    }

    #[test]
    fn parents_cannot_be_deleted_and_check_finds_leaks_and_double_owners() {
        let mut s = State::empty(geometry());
        s.apply(&Op::PutBlob(BlobMd { flags: FLAG_SNAPSHOT, ..md(1, vec![3]) })).unwrap();
        s.apply(&Op::PutBlob(BlobMd { flags: FLAG_THIN, parent: Some(1), ..md(2, vec![0]) })).unwrap();
        assert!(s.apply(&Op::DeleteBlob(1)).unwrap_err().0.contains("reads through it"));
        s.bitmap.set(50);
        s.blobs.get_mut(&2).unwrap().clusters[0] = 3;
        let problems = s.check(&[]);
        assert!(problems.iter().any(|p| p.contains("cluster 3 is owned by blob 2 and by blob 1")), "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("1 clusters marked in use but owned by nothing (leaked): 50")),
            "{problems:?}"
        );
    }
}
