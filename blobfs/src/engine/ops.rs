//! Blob operations, as tasks on the home reactor. Each takes the blob's lock
//! (operations on one blob, including first-write allocations, run one at a
//! time) and ends with one journal record; the live state changes in the same
//! step the record is queued, so records are journaled in the order the live
//! state changed.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::BlobError;
use crate::format::{
    BlobMd, FLAG_NO_ZERO, FLAG_READ_ONLY, FLAG_SNAPSHOT, FLAG_THIN, MAX_OVERCOMMIT, MAX_XATTR_VALUE, MAX_XATTRS_TOTAL,
    Op, check_xattr_name,
};
use crate::shared::BlobShared;

use super::{Engine, Live};

/// Options of a new blob.
#[derive(Debug, Clone, Default)]
pub struct BlobOptions {
    /// Size in clusters.
    pub num_clusters: u64,
    /// Allocate clusters on first write instead of now.
    pub thin: bool,
    /// Clusters are not zeroed before the blob gets them: only for an owner
    /// that never reads what it did not write (the `blob_create` RPC does not
    /// offer it: it would hand out what deleted blobs held).
    pub no_zero: bool,
    /// Extended attributes to start with (values as UTF-8 strings through the RPC).
    pub xattrs: BTreeMap<String, String>,
}

/// What `blob_list` and `Blobstore::info` report about a blob.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobInfo {
    /// Identifier.
    pub id: u64,
    /// Size in clusters.
    pub num_clusters: u64,
    /// Clusters allocated to the blob itself.
    pub allocated_clusters: u64,
    /// Clusters allocated on first write.
    pub thin: bool,
    /// Clusters not zeroed before the blob gets them.
    pub no_zero: bool,
    /// Writes refused.
    pub read_only: bool,
    /// A snapshot.
    pub snapshot: bool,
    /// The snapshot it reads through.
    pub parent: Option<u64>,
    /// Blobs reading through it.
    pub clones: Vec<u64>,
    /// Open handles.
    pub open: u32,
    /// Changes not synced.
    pub dirty: bool,
    /// Sync count.
    pub md_seq: u64,
    /// Xattr names.
    pub xattrs: Vec<String>,
}

fn check_xattrs(xattrs: &BTreeMap<String, Vec<u8>>) -> Result<(), BlobError> {
    let mut total = 0;
    for (k, v) in xattrs {
        check_xattr_name(k).map_err(|e| BlobError::invalid("xattr name", e))?;
        if v.len() > MAX_XATTR_VALUE {
            return Err(BlobError::invalid(
                "xattr value",
                format!("{} bytes for {k:?}; at most {MAX_XATTR_VALUE}", v.len()),
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_XATTRS_TOTAL {
        return Err(BlobError::invalid("xattrs", format!("{total} bytes in all; at most {MAX_XATTRS_TOTAL} per blob")));
    }
    Ok(())
}

impl Engine {
    fn check_size(&self, n: u64) -> Result<(), BlobError> {
        let max = self.store.geometry.num_clusters * MAX_OVERCOMMIT;
        if n > max {
            return Err(BlobError::invalid(
                "num_clusters",
                format!("{n} clusters; a blob may span at most {max} ({MAX_OVERCOMMIT}x the store)"),
            ));
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<(), BlobError> {
        match &self.inner.borrow().failed {
            Some(f) => {
                Err(BlobError::io(format!("the journal (store stopped taking changes: {f})"), nvme::IoError::Device))
            }
            None => Ok(()),
        }
    }

    /// The lock and shared view of a blob.
    pub(super) fn blob(&self, id: u64) -> Result<(Rc<tokio::sync::Mutex<()>>, Arc<BlobShared>), BlobError> {
        let inner = self.inner.borrow();
        let b = inner.blobs.get(&id).ok_or(BlobError::NoSuchBlob(id))?;
        Ok((b.lock.clone(), b.shared.clone()))
    }

    pub(super) fn with_live<T>(&self, id: u64, f: impl FnOnce(&mut Live) -> T) -> Result<T, BlobError> {
        let mut inner = self.inner.borrow_mut();
        inner.blobs.get_mut(&id).map(f).ok_or(BlobError::NoSuchBlob(id))
    }

    fn new_id(&self) -> u64 {
        let mut inner = self.inner.borrow_mut();
        let id = inner.next_id;
        inner.next_id += 1;
        id
    }

    /// Creates a blob and makes it durable.
    pub async fn create_blob(self: &Rc<Self>, opts: BlobOptions) -> Result<u64, BlobError> {
        self.check_usable()?;
        self.check_size(opts.num_clusters)?;
        let xattrs: BTreeMap<String, Vec<u8>> = opts.xattrs.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        check_xattrs(&xattrs)?;
        let clusters = if opts.thin {
            vec![0; opts.num_clusters as usize]
        } else {
            let c = self.reserve(opts.num_clusters)?;
            if let Err(e) = self.zero(if opts.no_zero { &[] } else { &c }).await {
                self.unreserve(&c);
                return Err(e);
            }
            c
        };
        let id = self.new_id();
        let flags = if opts.thin { FLAG_THIN } else { 0 } | if opts.no_zero { FLAG_NO_ZERO } else { 0 };
        let md = BlobMd { id, flags, parent: None, clusters: clusters.clone(), xattrs, md_seq: 1 };
        match self.commit(vec![Op::PutBlob(md.clone())]).await {
            Ok(()) => {
                let shared = BlobShared::new(id, &md.clusters, None, false);
                self.inner
                    .borrow_mut()
                    .blobs
                    .insert(id, Live { md, shared, open: 0, dirty: false, lock: Rc::default() });
                Ok(id)
            }
            Err(e) => {
                self.unreserve(&clusters);
                Err(e)
            }
        }
    }

    /// Opens a blob for I/O.
    pub fn open_blob(&self, id: u64) -> Result<Arc<BlobShared>, BlobError> {
        self.with_live(id, |b| {
            b.open += 1;
            b.shared.clone()
        })
    }

    /// Closes a handle, syncing the blob's metadata if it changed.
    pub async fn close_blob(self: &Rc<Self>, id: u64) -> Result<(), BlobError> {
        let result = self.sync_blob(id).await;
        self.with_live(id, |b| b.open = b.open.saturating_sub(1))?;
        result
    }

    /// Makes the blob's metadata changes durable, atomically.
    pub async fn sync_blob(self: &Rc<Self>, id: u64) -> Result<(), BlobError> {
        let (lock, _) = self.blob(id)?;
        let _guard = lock.lock().await;
        self.sync_locked(id).await
    }

    async fn sync_locked(self: &Rc<Self>, id: u64) -> Result<(), BlobError> {
        let rx = {
            let mut inner = self.inner.borrow_mut();
            let b = inner.blobs.get_mut(&id).ok_or(BlobError::NoSuchBlob(id))?;
            if !b.dirty {
                return Ok(());
            }
            b.md.md_seq += 1;
            b.dirty = false;
            let md = b.md.clone();
            drop(inner);
            self.enqueue(vec![Op::PutBlob(md)])
        };
        let result = rx.await.map_err(|_| BlobError::Unloaded).and_then(|r| r);
        if result.is_err() {
            let _ = self.with_live(id, |b| b.dirty = true);
        }
        result
    }

    /// Changes a blob's size. Growing a thick blob allocates (zeroed) clusters
    /// now; shrinking frees clusters at the next sync.
    pub async fn resize_blob(self: &Rc<Self>, id: u64, n: u64) -> Result<(), BlobError> {
        self.check_usable()?;
        self.check_size(n)?;
        let (lock, shared) = self.blob(id)?;
        let _guard = lock.lock().await;
        let (old, thin, ro, no_zero) = self.with_live(id, |b| {
            (b.md.clusters.len() as u64, b.md.has(FLAG_THIN), b.md.has(FLAG_READ_ONLY), b.md.has(FLAG_NO_ZERO))
        })?;
        if ro {
            return Err(BlobError::ReadOnly(id));
        }
        if n == old {
            return Ok(());
        }
        let added = if n > old && !thin {
            let c = self.reserve(n - old)?;
            if let Err(e) = self.zero(if no_zero { &[] } else { &c }).await {
                self.unreserve(&c);
                return Err(e);
            }
            c
        } else {
            Vec::new()
        };
        self.freeze(&shared).await;
        let durable: Vec<u64> =
            self.inner.borrow().durable.blobs.get(&id).map(|d| d.allocated().collect()).unwrap_or_default();
        let (clusters, parent, dropped) = self.with_live(id, |b| {
            let dropped: Vec<u64> = b.md.clusters.iter().skip(n as usize).copied().filter(|&c| c != 0).collect();
            b.md.clusters.truncate(n as usize);
            b.md.clusters.extend(added.iter().copied());
            b.md.clusters.resize(n as usize, 0);
            b.dirty = true;
            (b.md.clusters.clone(), b.shared.parent(), dropped)
        })?;
        shared.replace(&clusters, parent);
        self.thaw(&shared);
        // Clusters of an unsynced grow that a shrink drops again were never durable:
        // nothing can reach them any more (the blob was quiesced), so they go back now.
        // Durable ones are freed when the sync's record is.
        let never_durable: Vec<u64> = dropped.into_iter().filter(|c| !durable.contains(c)).collect();
        self.unreserve(&never_durable);
        Ok(())
    }

    /// Sets an xattr (durable at the next sync).
    pub fn set_xattr(&self, id: u64, name: &str, value: Vec<u8>) -> Result<(), BlobError> {
        self.with_live(id, |b| {
            if b.md.has(FLAG_READ_ONLY) {
                return Err(BlobError::ReadOnly(id));
            }
            let mut x = b.md.xattrs.clone();
            x.insert(name.to_string(), value);
            check_xattrs(&x)?;
            b.md.xattrs = x;
            b.dirty = true;
            Ok(())
        })?
    }

    /// Removes an xattr (durable at the next sync).
    pub fn remove_xattr(&self, id: u64, name: &str) -> Result<(), BlobError> {
        self.with_live(id, |b| {
            if b.md.has(FLAG_READ_ONLY) {
                return Err(BlobError::ReadOnly(id));
            }
            match b.md.xattrs.remove(name) {
                Some(_) => {
                    b.dirty = true;
                    Ok(())
                }
                None => Err(BlobError::invalid("xattr name", format!("blob {id} has no xattr {name:?}"))),
            }
        })?
    }

    /// A blob's xattrs as they are now.
    pub fn xattrs(&self, id: u64) -> Result<BTreeMap<String, Vec<u8>>, BlobError> {
        self.with_live(id, |b| b.md.xattrs.clone())
    }

    /// Deletes a closed blob that no clone reads through.
    pub async fn delete_blob(self: &Rc<Self>, id: u64) -> Result<(), BlobError> {
        self.check_usable()?;
        let (lock, _) = self.blob(id)?;
        let _guard = lock.lock().await;
        let extra = {
            let inner = self.inner.borrow();
            let b = inner.blobs.get(&id).ok_or(BlobError::NoSuchBlob(id))?;
            if b.open > 0 {
                return Err(BlobError::Open { id, count: b.open });
            }
            let mut clones: Vec<u64> =
                inner.blobs.values().filter(|x| x.md.parent == Some(id)).map(|x| x.md.id).collect();
            if !clones.is_empty() {
                clones.sort_unstable();
                return Err(BlobError::HasClones { id, clones });
            }
            let durable: Vec<u64> = inner.durable.blobs.get(&id).map(|d| d.allocated().collect()).unwrap_or_default();
            // Clusters reserved for an unsynced resize are not in the durable blob.
            b.md.allocated().filter(|c| !durable.contains(c)).collect::<Vec<u64>>()
        };
        self.commit(vec![Op::DeleteBlob(id)]).await?;
        self.inner.borrow_mut().blobs.remove(&id);
        self.unreserve(&extra);
        Ok(())
    }

    /// Snapshots a blob: a new read-only blob takes over its clusters and the
    /// blob becomes a thin clone of it. Returns the snapshot's id.
    pub async fn snapshot(self: &Rc<Self>, id: u64, xattrs: BTreeMap<String, Vec<u8>>) -> Result<u64, BlobError> {
        self.check_usable()?;
        check_xattrs(&xattrs)?;
        let (lock, shared) = self.blob(id)?;
        let _guard = lock.lock().await;
        if self.with_live(id, |b| b.md.has(FLAG_SNAPSHOT))? {
            return Err(BlobError::invalid("blob", format!("blob {id} is a snapshot already; clone it first")));
        }
        self.freeze(&shared).await;
        let snap_id = self.new_id();
        let (origin_now, snap_md, origin_md) = self.with_live(id, |b| {
            let snap = BlobMd {
                id: snap_id,
                flags: FLAG_SNAPSHOT | FLAG_READ_ONLY | (b.md.flags & FLAG_THIN),
                parent: b.md.parent,
                clusters: b.md.clusters.clone(),
                xattrs: xattrs.clone(),
                md_seq: 1,
            };
            let origin = BlobMd {
                flags: b.md.flags | FLAG_THIN,
                parent: Some(snap_id),
                clusters: vec![0; b.md.clusters.len()],
                md_seq: b.md.md_seq + 1,
                ..b.md.clone()
            };
            (b.md.clone(), snap, origin)
        })?;
        // The origin's unsynced changes become durable in the same record.
        let ops = vec![Op::PutBlob(origin_now), Op::Snapshot { snapshot: snap_md.clone(), origin: origin_md.clone() }];
        if let Err(e) = self.commit(ops).await {
            self.thaw(&shared);
            return Err(e);
        }
        let snap_shared = BlobShared::new(snap_id, &snap_md.clusters, shared.parent(), true);
        shared.replace(&origin_md.clusters, Some(snap_shared.clone()));
        {
            let mut inner = self.inner.borrow_mut();
            inner
                .blobs
                .insert(snap_id, Live { md: snap_md, shared: snap_shared, open: 0, dirty: false, lock: Rc::default() });
            let b = inner.blobs.get_mut(&id).expect("locked above");
            b.md = origin_md;
            b.dirty = false;
        }
        self.thaw(&shared);
        Ok(snap_id)
    }

    /// Creates a writable thin clone of a snapshot. Returns its id.
    pub async fn clone_blob(
        self: &Rc<Self>,
        snapshot: u64,
        xattrs: BTreeMap<String, Vec<u8>>,
    ) -> Result<u64, BlobError> {
        self.check_usable()?;
        check_xattrs(&xattrs)?;
        let (snap_shared, size) = {
            let inner = self.inner.borrow();
            let s = inner.blobs.get(&snapshot).ok_or(BlobError::NoSuchBlob(snapshot))?;
            if !s.md.has(FLAG_SNAPSHOT) {
                return Err(BlobError::NotSnapshot(snapshot));
            }
            (s.shared.clone(), s.md.clusters.len())
        };
        let id = self.new_id();
        let md = BlobMd { id, flags: FLAG_THIN, parent: Some(snapshot), clusters: vec![0; size], xattrs, md_seq: 1 };
        self.commit(vec![Op::PutBlob(md.clone())]).await?;
        let shared = BlobShared::new(id, &md.clusters, Some(snap_shared), false);
        self.inner.borrow_mut().blobs.insert(id, Live { md, shared, open: 0, dirty: false, lock: Rc::default() });
        Ok(id)
    }

    /// Gives a blob clusters of its own for everything it reads through its
    /// parents (`all`: inflate, for every cluster, zeroed where no parent has
    /// data; otherwise decouple: only those its immediate parent holds).
    async fn take_over(self: &Rc<Self>, id: u64, all: bool) -> Result<(), BlobError> {
        self.check_usable()?;
        let (lock, shared) = self.blob(id)?;
        let _guard = lock.lock().await;
        let (mut clusters, parent, ro) =
            self.with_live(id, |b| (b.md.clusters.clone(), b.md.parent, b.md.has(FLAG_READ_ONLY)))?;
        if ro {
            return Err(BlobError::ReadOnly(id));
        }
        let parent_shared = shared.parent();
        let new_parent = match (all, parent) {
            (true, _) => None,
            (false, None) => {
                return Err(BlobError::invalid("blob", format!("blob {id} has no parent to decouple from")));
            }
            (false, Some(p)) => self.inner.borrow().blobs.get(&p).and_then(|b| b.md.parent),
        };
        self.freeze(&shared).await;
        let result = async {
            let mut need: Vec<(usize, Option<u64>)> = Vec::new();
            for (i, &c) in clusters.iter().enumerate() {
                if c != 0 {
                    continue;
                }
                let src = if all {
                    shared.inherited(i as u64)
                } else {
                    parent_shared.as_ref().map(|p| p.own(i as u64)).filter(|&p| p != 0)
                };
                if all || src.is_some() {
                    need.push((i, src));
                }
            }
            let got = self.reserve(need.len() as u64)?;
            let copied = async {
                let mut zeroes = Vec::new();
                for (&(_, src), &dst) in need.iter().zip(&got) {
                    match src {
                        Some(s) => self.io.copy_cluster(s, dst).await?,
                        None => zeroes.push(dst),
                    }
                }
                self.zero(&zeroes).await?;
                self.io.flush().await
            }
            .await;
            if let Err(e) = copied {
                self.unreserve(&got);
                return Err(e);
            }
            for (&(i, _), &dst) in need.iter().zip(&got) {
                clusters[i] = dst;
            }
            let md = self.with_live(id, |b| {
                let mut md = b.md.clone();
                md.clusters = clusters.clone();
                md.parent = new_parent;
                if all {
                    md.flags &= !FLAG_THIN;
                }
                md.md_seq += 1;
                md
            })?;
            if let Err(e) = self.commit(vec![Op::PutBlob(md.clone())]).await {
                self.unreserve(&got);
                return Err(e);
            }
            let new_parent_shared =
                new_parent.and_then(|p| self.inner.borrow().blobs.get(&p).map(|b| b.shared.clone()));
            shared.replace(&md.clusters, new_parent_shared);
            self.with_live(id, |b| {
                b.md = md;
                b.dirty = false;
            })
        }
        .await;
        self.thaw(&shared);
        result
    }

    /// Makes a blob independent of its parents (allocates every cluster).
    pub async fn inflate(self: &Rc<Self>, id: u64) -> Result<(), BlobError> {
        self.take_over(id, true).await
    }

    /// Copies what the immediate parent holds; the parent's parent becomes the blob's parent.
    pub async fn decouple(self: &Rc<Self>, id: u64) -> Result<(), BlobError> {
        self.take_over(id, false).await
    }

    /// Sets (or clears) the super blob.
    pub async fn set_super(self: &Rc<Self>, id: Option<u64>) -> Result<(), BlobError> {
        self.check_usable()?;
        if let Some(id) = id {
            self.blob(id)?;
        }
        self.commit(vec![Op::SetSuper(id)]).await
    }

    /// The super blob.
    pub fn get_super(&self) -> Option<u64> {
        self.inner.borrow().durable.super_blob
    }

    /// Facts about one blob.
    pub fn info(&self, id: u64) -> Result<BlobInfo, BlobError> {
        let inner = self.inner.borrow();
        let b = inner.blobs.get(&id).ok_or(BlobError::NoSuchBlob(id))?;
        let mut clones: Vec<u64> = inner.blobs.values().filter(|x| x.md.parent == Some(id)).map(|x| x.md.id).collect();
        clones.sort_unstable();
        Ok(BlobInfo {
            id,
            num_clusters: b.md.clusters.len() as u64,
            allocated_clusters: b.md.allocated().count() as u64,
            thin: b.md.has(FLAG_THIN),
            no_zero: b.md.has(FLAG_NO_ZERO),
            read_only: b.md.has(FLAG_READ_ONLY),
            snapshot: b.md.has(FLAG_SNAPSHOT),
            parent: b.md.parent,
            clones,
            open: b.open,
            dirty: b.dirty,
            md_seq: b.md.md_seq,
            xattrs: b.md.xattrs.keys().cloned().collect(),
        })
    }

    /// Changes a blob's open count (a handle dropped without `close`).
    pub fn with_open(&self, id: u64, f: impl FnOnce(&mut u32)) -> Result<(), BlobError> {
        self.with_live(id, |b| f(&mut b.open))
    }

    /// Every blob's id, ascending.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.inner.borrow().blobs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}
