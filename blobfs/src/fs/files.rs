//! The file system as a whole: metadata through the Raft group, file data
//! in the data pool, and what ties them together — chunk writes before the
//! commands that map them, freeing what commands let go of, open counts that
//! keep unlinked files alive, and `fsync`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pmd::ReactorHandle;

use super::data::DataPool;
use super::raft::{MetaOptions, MetaRaft, xattr_u64};
use super::{Attr, ChunkRef, Cmd, Errno, Ino, Reply, SetAttr, Time};
use crate::format::PAGE_SIZE;
use crate::{BlobError, BlobOptions, Blobstore};

/// The root blob's xattr naming the data pool blob.
const POOL_XATTR: &str = "claudefs.fs.data";

/// A mounted-or-not file system on a blobstore.
pub struct FileSystem {
    meta: MetaRaft,
    data: DataPool,
    chunk_size: u64,
    /// One writer at a time per file (a write rewrites whole chunks).
    writers: Mutex<HashMap<Ino, Arc<tokio::sync::Mutex<()>>>>,
    /// Open handles per inode: an unlinked inode lives while it has any.
    open: Mutex<HashMap<Ino, u32>>,
    /// The pool blob, open until [`FileSystem::shutdown`].
    pool: super::HeldBlob,
    /// A snapshot to make room is under way.
    compacting: Arc<std::sync::atomic::AtomicBool>,
}

impl FileSystem {
    /// Opens (creating if the store has none) the file system on `store`;
    /// data I/O runs on `reactors`. Orphans a previous run left (unlinked
    /// files that were open when it stopped) are reclaimed.
    pub async fn open(store: &Blobstore, reactors: Vec<ReactorHandle>, opts: MetaOptions) -> Result<Self, BlobError> {
        let meta = MetaRaft::open(store, opts).await?;
        let root = store.get_super().await?.expect("MetaRaft::open made a root");
        let pool = match xattr_u64(&store.xattrs(root).await?, POOL_XATTR)? {
            Some(b) => b,
            None => {
                // Thin, as large as the whole store: space is what the store has.
                let clusters = store.stats().await?.total_clusters;
                let b =
                    store.create_blob(BlobOptions { num_clusters: clusters, thin: true, ..Default::default() }).await?;
                store.sync_blob(b).await?;
                store.set_xattr(root, POOL_XATTR, &b.to_le_bytes()).await?;
                store.sync_blob(root).await?;
                b
            }
        };
        let handle = store.open_blob(pool).await?;
        let blob = handle.shared().clone();
        let (chunk_size, used) = meta.read(|s| (s.chunk_size(), s.all_chunks().collect::<Vec<_>>()));
        let data = DataPool::new(store.clone(), blob, reactors, used, meta.durable_records(), meta.data_written())
            .map_err(|e| BlobError::corrupt(format!("file system on {}", store.bdev_name()), e))?;
        let fs = FileSystem {
            meta,
            data,
            chunk_size,
            writers: Mutex::default(),
            open: Mutex::default(),
            pool: super::HeldBlob::new(handle),
            compacting: Arc::default(),
        };
        let orphans: Vec<Ino> = fs.meta.orphans().into_iter().collect();
        if !orphans.is_empty() {
            tracing::info!("reclaiming {} orphan inode(s) left by the previous run", orphans.len());
            fs.reclaim(orphans).await.map_err(|e| BlobError::MetaGroup(format!("reclaiming orphans: {e}")))?;
        }
        Ok(fs)
    }

    /// The metadata (for lookups, getattr, readdir, xattrs, ...).
    pub fn meta(&self) -> &MetaRaft {
        &self.meta
    }

    /// Pages of the data pool, and pages free.
    pub fn space(&self) -> (u64, u64) {
        self.data.space()
    }

    /// Applies a metadata command and does what its reply asks: frees the
    /// chunks it let go of, reclaims the orphans nobody has open.
    pub async fn apply(&self, cmd: Cmd) -> Result<Reply, Errno> {
        // The metadata log needs store space too: near the end, only what
        // frees space (or moves it) gets any.
        let frees = matches!(
            cmd,
            Cmd::Unlink { .. }
                | Cmd::Rmdir { .. }
                | Cmd::Rename { .. }
                | Cmd::SetAttr { .. }
                | Cmd::RemoveXattr { .. }
                | Cmd::Punch { .. }
                | Cmd::Reclaim { .. }
        );
        if self.data.metadata_space_low() {
            self.compact();
            if !frees {
                return Err(Errno::ENOSPC);
            }
        }
        let reply = self.meta.write(cmd).await?;
        match &reply {
            Reply::Attr(_, freed) | Reply::Freed(freed) => {
                self.data.free_after(self.meta.log_position(), freed.iter().copied())
            }
            Reply::Removed { orphaned } => {
                let closed: Vec<Ino> = {
                    let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
                    orphaned.iter().copied().filter(|i| !open.contains_key(i)).collect()
                };
                self.reclaim(closed).await?;
            }
            Reply::Entry(_) | Reply::Done => {}
        }
        Ok(reply)
    }

    /// Starts a snapshot (unless one is under way): the log before it can
    /// then go, and the log's next rotation gives its space back.
    fn compact(&self) {
        if self.compacting.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        tracing::warn!("the store is nearly full: taking a metadata snapshot to shrink the log");
        let (meta, flag) = (self.meta.clone(), self.compacting.clone());
        tokio::spawn(async move {
            if let Err(e) = meta.snapshot().await {
                tracing::error!("metadata snapshot for space failed: {e:?}");
            }
            flag.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    async fn reclaim(&self, inos: Vec<Ino>) -> Result<(), Errno> {
        if inos.is_empty() {
            return Ok(());
        }
        if let Reply::Freed(freed) = self.meta.write(Cmd::Reclaim { inos }).await? {
            self.data.free_after(self.meta.log_position(), freed);
        }
        Ok(())
    }

    /// Records an open handle of `ino`.
    pub fn opened(&self, ino: Ino) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()).entry(ino).or_default() += 1;
    }

    /// Drops an open handle; the last one of an unlinked inode frees it.
    pub async fn released(&self, ino: Ino) -> Result<(), Errno> {
        let last = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            match open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    open.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if last && self.meta.read(|s| s.getattr(ino).is_ok_and(|a| a.nlink == 0)) {
            self.reclaim(vec![ino]).await?;
        }
        Ok(())
    }

    fn writer(&self, ino: Ino) -> Arc<tokio::sync::Mutex<()>> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner()).entry(ino).or_default().clone()
    }

    /// Reads up to `size` bytes at `offset` (fewer at the end of the file;
    /// holes read as zeros).
    pub async fn read(&self, ino: Ino, offset: u64, size: usize) -> Result<Vec<u8>, Errno> {
        // The ticket comes before the lookup: chunks freed after it stay
        // untouched until this read is done.
        let _ticket = self.data.ticket();
        let cs = self.chunk_size;
        let (file_size, chunks) = self.meta.read(|s| {
            let a = s.getattr(ino)?;
            if a.kind == super::FileKind::Dir {
                return Err(Errno::EISDIR);
            }
            let end = a.size.min(offset.saturating_add(size as u64));
            let chunks: Vec<(u64, ChunkRef)> = if end > offset {
                s.chunks(ino, offset / cs)?.take_while(|&(i, _)| i * cs < end).collect()
            } else {
                Vec::new()
            };
            Ok((a.size, chunks))
        })?;
        let end = file_size.min(offset.saturating_add(size as u64));
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        for (index, chunk) in chunks {
            let start = index * cs;
            // The pages of this chunk that overlap [offset, end).
            let from = offset.max(start) - start;
            let to = (end.min(start + cs) - start).min(u64::from(chunk.pages) * PAGE_SIZE as u64);
            if to <= from {
                continue;
            }
            let first_page = from / PAGE_SIZE as u64;
            let pages = to.div_ceil(PAGE_SIZE as u64) - first_page;
            let sub = ChunkRef { page: chunk.page + first_page, pages: pages as u32, ..chunk };
            let mut buf = vec![0u8; pages as usize * PAGE_SIZE];
            self.data.read(sub, &mut buf).await?;
            let skip = (from - first_page * PAGE_SIZE as u64) as usize;
            let dst = (start + from - offset) as usize;
            let n = (to - from) as usize;
            out[dst..dst + n].copy_from_slice(&buf[skip..skip + n]);
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; returns the file's attributes after.
    pub async fn write(&self, ino: Ino, offset: u64, data: &[u8], now: Time) -> Result<Attr, Errno> {
        let end =
            offset.checked_add(data.len() as u64).filter(|&e| e <= super::types::FILE_SIZE_MAX).ok_or(Errno::EFBIG)?;
        let lock = self.writer(ino);
        let _guard = lock.lock().await;
        let cs = self.chunk_size;
        if data.is_empty() {
            return self.meta.read(|s| s.getattr(ino).cloned());
        }
        let (size, old) = self.file_chunks(ino, offset, end, Errno::EINVAL)?;
        let mut written: Vec<(u64, ChunkRef)> = Vec::new();
        let result = async {
            for index in offset / cs..end.div_ceil(cs) {
                let start = index * cs;
                let (from, to) = (offset.max(start) - start, end.min(start + cs) - start);
                // What the chunk holds now: data up to the file's end, zeros after.
                let valid = size.saturating_sub(start).min(cs);
                let keep = if from > 0 || to < valid { valid } else { 0 };
                let src = &data[(start + from - offset) as usize..(start + to - offset) as usize];
                let chunk = self
                    .rewrite(old.get(&index).copied(), keep, valid.max(to), |buf| {
                        buf[from as usize..to as usize].copy_from_slice(src)
                    })
                    .await?;
                written.push((index, chunk));
            }
            Ok::<_, Errno>(())
        }
        .await;
        self.map_written(result, written, |chunks| Cmd::Write { ino, chunks, end, now }).await
    }

    /// A regular file's size and its chunks overlapping `[offset, end)`;
    /// a directory is EISDIR, anything else `not_a_file`.
    fn file_chunks(
        &self,
        ino: Ino,
        offset: u64,
        end: u64,
        not_a_file: Errno,
    ) -> Result<(u64, HashMap<u64, ChunkRef>), Errno> {
        let cs = self.chunk_size;
        self.meta.read(|s| {
            let a = s.getattr(ino)?;
            match a.kind {
                super::FileKind::File => {}
                super::FileKind::Dir => return Err(Errno::EISDIR),
                _ => return Err(not_a_file),
            }
            Ok((a.size, s.chunks(ino, offset / cs)?.take_while(|&(i, _)| i * cs < end).collect()))
        })
    }

    /// A new chunk of `len` bytes: the first `keep` bytes of `old` (zeros
    /// where it has none), changed by `edit`, written to fresh pages.
    async fn rewrite(
        &self,
        old: Option<ChunkRef>,
        keep: u64,
        len: u64,
        edit: impl FnOnce(&mut [u8]),
    ) -> Result<ChunkRef, Errno> {
        let mut buf = vec![0u8; len as usize];
        if let Some(c) = old
            && keep > 0
        {
            self.data.read(c, &mut buf[..keep as usize]).await?;
        }
        edit(&mut buf);
        let pages = len.div_ceil(PAGE_SIZE as u64) as u32;
        let chunk = match self.data.alloc(pages) {
            // Space a delete let go of comes back once the delete is
            // durable: wait for that rather than fail.
            Err(Errno::ENOSPC) if self.data.frees_waiting() => {
                self.meta.sync().await?;
                self.data.alloc(pages)?
            }
            r => r?,
        };
        if let Err(e) = self.data.write(chunk, &buf).await {
            self.data.free([chunk]);
            return Err(e);
        }
        Ok(chunk)
    }

    /// Maps freshly written `chunks` by the command `cmd` makes of them,
    /// unless writing them failed (`written`); pages left unmapped either
    /// way are free again.
    async fn map_written(
        &self,
        written: Result<(), Errno>,
        chunks: Vec<(u64, ChunkRef)>,
        cmd: impl FnOnce(Vec<(u64, ChunkRef)>) -> Cmd,
    ) -> Result<Attr, Errno> {
        let pages: Vec<ChunkRef> = chunks.iter().map(|&(_, c)| c).collect();
        let result = match written {
            Ok(()) => self.apply(cmd(chunks)).await,
            Err(e) => Err(e),
        };
        result.map(attributes).inspect_err(|_| self.data.free(pages))
    }

    /// fallocate(2). Modes: 0 and `FALLOC_FL_KEEP_SIZE` check that the
    /// range's holes fit in the free space and (without KEEP_SIZE) grow the
    /// size — no pages are reserved, as every write goes to fresh pages
    /// anyway (docs/fs.md); `FALLOC_FL_PUNCH_HOLE` (with KEEP_SIZE) frees
    /// the range, which reads as zeros after; `FALLOC_FL_ZERO_RANGE` zeroes
    /// it, growing the size unless KEEP_SIZE. Other modes: EOPNOTSUPP.
    pub async fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: i32, now: Time) -> Result<Attr, Errno> {
        use libc::{FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH, FALLOC_FL_ZERO_RANGE as ZERO};
        if mode & !(KEEP | PUNCH | ZERO) != 0 || mode & PUNCH != 0 && mode & (ZERO | KEEP) != KEEP {
            return Err(Errno::EOPNOTSUPP);
        }
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = offset.checked_add(len).filter(|&e| e <= super::types::FILE_SIZE_MAX).ok_or(Errno::EFBIG)?;
        let lock = self.writer(ino);
        let _guard = lock.lock().await;
        let cs = self.chunk_size;
        let (size, old) = self.file_chunks(ino, offset, end, Errno::ENODEV)?;
        let mut attr = None;
        if mode & (PUNCH | ZERO) != 0 {
            attr = Some(self.zero_range(ino, offset, end.min(size), size, &old, now).await?);
        } else {
            // The pages the range's holes would take.
            let needed: u64 = (offset / cs..end.div_ceil(cs))
                .filter(|i| !old.contains_key(i))
                .map(|i| (end.min((i + 1) * cs) - i * cs).div_ceil(PAGE_SIZE as u64))
                .sum();
            if needed > self.data.space().1 {
                return Err(Errno::ENOSPC);
            }
        }
        if mode & KEEP == 0 && end > size {
            let set = SetAttr { size: Some(end), ..Default::default() };
            return self.apply(Cmd::SetAttr { ino, set, now }).await.map(attributes);
        }
        match attr {
            Some(a) => Ok(a),
            None => self.meta.read(|s| s.getattr(ino).cloned()),
        }
    }

    /// Zeroes `[offset, end)` of a file of `size` bytes whose chunks there
    /// are `old`: whole chunks become holes, the edges are rewritten.
    async fn zero_range(
        &self,
        ino: Ino,
        offset: u64,
        end: u64,
        size: u64,
        old: &HashMap<u64, ChunkRef>,
        now: Time,
    ) -> Result<Attr, Errno> {
        let cs = self.chunk_size;
        let (mut holes, mut written) = (Vec::new(), Vec::new());
        let result = async {
            for index in (offset / cs..end.div_ceil(cs)).filter(|i| old.contains_key(i)) {
                let start = index * cs;
                let valid = size.saturating_sub(start).min(cs);
                let (from, to) = (offset.max(start) - start, (end - start).min(valid));
                if from == 0 && to == valid {
                    holes.push(index);
                } else {
                    let chunk = self
                        .rewrite(Some(old[&index]), valid, valid, |buf| buf[from as usize..to as usize].fill(0))
                        .await?;
                    written.push((index, chunk));
                }
            }
            Ok::<_, Errno>(())
        }
        .await;
        self.map_written(result, written, |chunks| Cmd::Punch { ino, holes, chunks, now }).await
    }

    /// Changes attributes; a size that cuts into a chunk rewrites that chunk
    /// with its tail zeroed, in the same command as the size.
    pub async fn setattr(&self, ino: Ino, mut set: SetAttr, now: Time) -> Result<Attr, Errno> {
        let lock = self.writer(ino);
        let _guard = lock.lock().await;
        let mut tail = None;
        if let Some(size) = set.size {
            let cs = self.chunk_size;
            let cut = self.meta.read(|s| {
                let a = s.getattr(ino)?;
                let within = size % cs;
                if size >= a.size || within == 0 || a.kind != super::FileKind::File {
                    return Ok(None);
                }
                Ok(s.chunks(ino, size / cs)?.next().filter(|&(i, _)| i == size / cs))
            })?;
            if let Some((index, old)) = cut {
                let len = within_len(size, cs);
                let chunk = self.rewrite(Some(old), len, len, |_| {}).await?;
                tail = Some(chunk);
                set.tail = Some((index, chunk));
            }
        }
        self.apply(Cmd::SetAttr { ino, set, now }).await.map(attributes).inspect_err(|_| self.data.free(tail))
    }

    /// Makes everything written so far durable: file data, then metadata
    /// (what `fsync` of any file or directory promises).
    pub async fn sync(&self) -> Result<(), Errno> {
        self.data.flush().await?;
        self.meta.sync().await
    }

    /// Makes everything durable, stops the metadata group and closes the
    /// file system's blobs (so the store can be unloaded cleanly).
    pub async fn shutdown(&self) -> Result<(), Errno> {
        self.sync().await?;
        self.meta.shutdown().await?;
        self.pool.close("data pool").await
    }
}

/// The attributes a command changing one inode (write, setattr, punch)
/// replies with.
fn attributes(reply: Reply) -> Attr {
    match reply {
        Reply::Attr(a, _) => a,
        r => unreachable!("a command changing one inode replies with attributes, not {r:?}"),
    }
}

/// Bytes of the chunk holding byte `size - 1` that lie below `size`.
fn within_len(size: u64, cs: u64) -> u64 {
    size - (size - 1) / cs * cs
}
