//! The file system as a whole: metadata through the Raft group, file data
//! in the data pool, and what ties them together — chunk writes before the
//! commands that map them, freeing what commands let go of, the open handles
//! and lookups that keep unlinked files alive, and `fsync`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pmd::ReactorHandle;

use super::data::DataPool;
use super::raft::{MetaOptions, MetaRaft, xattr_u64};
use super::{Attr, ChunkRef, Cmd, DropPrivs, Errno, Ino, Reply, SetAttr, Time};
use crate::format::PAGE_SIZE;

/// Bytes per page of file data.
const PAGE: u64 = PAGE_SIZE as u64;
use crate::{BlobError, BlobOptions, Blobstore};

/// The root blob's xattr naming the data pool blob.
const POOL_XATTR: &str = "claudefs.fs.data";

/// A mounted-or-not file system on a blobstore.
pub struct FileSystem {
    pub(super) meta: MetaRaft,
    pub(super) data: DataPool,
    /// Keys and garbage collection of reduced files.
    pub(super) reduction: super::reduce_io::Reduction,
    pub(super) chunk_size: u64,
    /// Per file: held shared by writes of whole units, alone by everything
    /// that reads what it rewrites (see [`FileSystem::write`]).
    writers: Mutex<HashMap<Ino, Arc<tokio::sync::RwLock<()>>>>,
    /// What clients hold of each inode: an unlinked inode lives while it
    /// is held.
    refs: Mutex<HashMap<Ino, Refs>>,
    /// The pool blob, open until [`FileSystem::shutdown`].
    pool: super::HeldBlob,
    /// Held while a snapshot to make room is under way.
    compaction: Arc<tokio::sync::Mutex<()>>,
    /// Writes answered before their data is mapped ([`super::behind`]).
    pub(super) behind: super::behind::Behind,
}

impl FileSystem {
    /// Opens (creating if the store has none) the file system on `store`;
    /// data I/O runs on `reactors`. Orphans a previous run left (unlinked
    /// files that were open when it stopped) are reclaimed.
    pub async fn open(store: &Blobstore, reactors: Vec<ReactorHandle>, opts: MetaOptions) -> Result<Self, BlobError> {
        Self::open_keyed(store, reactors, opts, None).await
    }

    /// [`FileSystem::open`] with the master key of encrypted data
    /// (docs/reduce.md). The first key given to a file system is the one it
    /// keeps: a different one, or none once it has one, is refused.
    pub async fn open_keyed(
        store: &Blobstore,
        reactors: Vec<ReactorHandle>,
        opts: MetaOptions,
        key: Option<KeySource>,
    ) -> Result<Self, BlobError> {
        let meta = MetaRaft::open(store, opts).await?;
        let root = store.get_super().await?.expect("MetaRaft::open made a root");
        let xattrs = store.xattrs(root).await?;
        let keys = match master_key(store, root, &xattrs, key).await {
            Ok(k) => k,
            Err(e) => {
                meta.shutdown().await.ok();
                return Err(e);
            }
        };
        let pool = match xattr_u64(&xattrs, POOL_XATTR)? {
            Some(b) => b,
            None => {
                // Thin, as large as the whole store: space is what the store has.
                let clusters = store.stats().await?.total_clusters;
                let b = store
                    .create_blob(BlobOptions {
                        num_clusters: clusters,
                        thin: true,
                        no_zero: true,
                        ..Default::default()
                    })
                    .await?;
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
            reduction: super::reduce_io::Reduction::new(keys),
            chunk_size,
            writers: Mutex::default(),
            refs: Mutex::default(),
            pool: super::HeldBlob::new(handle),
            compaction: Arc::default(),
            behind: super::behind::Behind::new(),
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
                | Cmd::SetAttrDropping { .. }
                | Cmd::RemoveXattr { .. }
                | Cmd::Punch { .. }
                | Cmd::PunchRange { .. }
                | Cmd::Reclaim { .. }
                | Cmd::ReduceMove { .. }
                | Cmd::ReduceRepair { .. }
        ) || matches!(&cmd, Cmd::ReduceWrite { views, .. } if views.is_empty());
        if let Cmd::SetXattr { name, value, .. } = &cmd
            && name == super::state::POLICY_XATTR
            && !self.reduction.keys.has_key()
            && super::reduced::parse_policy(value).is_some_and(|p| p.encrypt)
        {
            tracing::warn!("a reduce policy that encrypts needs the file system to be mounted with a master key");
            return Err(Errno(libc::ENOKEY));
        }
        if self.data.metadata_space_low() {
            self.compact();
            if !frees {
                return Err(Errno::ENOSPC);
            }
            // Wait for the snapshot: records logged meanwhile would spend the
            // last clusters it needs, and a log or snapshot write that finds
            // no room stops the metadata group.
            drop(self.compaction.lock().await);
        }
        let tight = self.data.metadata_space_tight();
        let reply = self.meta.write(cmd).await?;
        if tight {
            // Near the end of the store, each command waits for its record:
            // records written behind would pile up unseen by the checks
            // above (hundreds of unlinks queued 1.3 MiB of records on an
            // 8 MiB store that had 0.5 MiB left, and the log write failed).
            self.meta.sync().await?;
        }
        self.applied(&reply).await?;
        Ok(reply)
    }

    /// Does what an applied command's reply asks: frees the chunks it let
    /// go of, reclaims the orphans nobody has open.
    async fn applied(&self, reply: &Reply) -> Result<(), Errno> {
        match reply {
            Reply::Attr(_, freed) | Reply::Freed(freed) => {
                self.data.free_after(self.meta.log_position(), freed.iter().copied())
            }
            Reply::Removed { orphaned } => {
                let unheld: Vec<Ino> = {
                    let refs = self.refs();
                    orphaned.iter().copied().filter(|i| !refs.contains_key(i)).collect()
                };
                self.reclaim(unheld).await?;
            }
            Reply::Entry(_) | Reply::Done => {}
        }
        Ok(())
    }

    /// Unlinks `name` from directory `parent` if that is sure to succeed,
    /// without waiting for it to apply: the caller answers at once, and
    /// the unlink applies behind on the metadata thread, followed by the
    /// reclaim of its inode if nobody holds it (see
    /// [`MetaRaft::unlink_ahead`]; readers see it gone at once, `sync`
    /// waits for both). Returns false, with nothing done, when the unlink
    /// must go through [`FileSystem::apply`] instead (which gives its
    /// error, if any); so it does near the end of the store, where each
    /// command waits for its log record.
    pub fn unlink_ahead(self: &Arc<Self>, parent: Ino, name: &[u8], now: Time) -> bool {
        // Low space (half the reserve) is tight space too.
        if self.data.metadata_space_tight() {
            return false;
        }
        let fs = self.clone();
        self.meta.unlink_ahead(parent, name, now, move |reply| async move { fs.applied(&reply?).await })
    }

    /// Creates the regular file `name` in directory `parent` (`perm`,
    /// umask applied, by `by`) if that is sure to succeed, without waiting
    /// for it to apply: the caller answers at once with the attributes it
    /// gets, and the create applies behind on the metadata thread (see
    /// [`MetaRaft::create_ahead`]; readers see the file at once, `sync`
    /// waits for it). Anything but its attributes and its entry waits for
    /// the apply: see [`FileSystem::created`]. None, with nothing done,
    /// when the create must go through [`FileSystem::apply`] instead; so
    /// it does near the end of the store.
    pub fn create_ahead(&self, parent: Ino, name: &[u8], perm: u32, by: super::Creator) -> Option<super::Attr> {
        if self.data.metadata_space_tight() {
            return None;
        }
        self.meta.create_ahead(parent, name, perm, by)
    }

    /// Blocks until `ino`, if it is a file created ahead, has applied
    /// (microseconds; at once for any other inode). A caller that asks
    /// more of an inode than its attributes, or changes it, calls this
    /// first.
    pub fn created(&self, ino: Ino) {
        self.meta.wait_created(ino)
    }

    /// Starts a snapshot (unless one is under way): the log before it can
    /// then go, and the log's next rotation gives its space back. The
    /// compaction lock is held until it is done.
    fn compact(&self) {
        let Ok(running) = self.compaction.clone().try_lock_owned() else { return };
        tracing::warn!("the store is nearly full: taking a metadata snapshot to shrink the log");
        let meta = self.meta.clone();
        tokio::spawn(async move {
            if let Err(e) = meta.snapshot().await {
                tracing::error!("metadata snapshot for space failed: {e:?}");
            }
            drop(running);
        });
    }

    async fn reclaim(&self, inos: Vec<Ino>) -> Result<(), Errno> {
        if inos.is_empty() {
            return Ok(());
        }
        let reply = self.meta.write(Cmd::Reclaim { inos: inos.clone() }).await?;
        if let Reply::Freed(freed) = reply {
            self.data.free_after(self.meta.log_position(), freed);
        }
        // An error its last writes behind met dies with it.
        inos.into_iter().for_each(|ino| self.behind.forget(ino));
        Ok(())
    }

    fn refs(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, Refs>> {
        self.refs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an open handle of `ino` and returns its number: the handle
    /// is told of errors of writes behind once each
    /// ([`FileSystem::write_error`]).
    pub fn opened(&self, ino: Ino) -> u64 {
        self.refs().entry(ino).or_default().open += 1;
        self.behind.open(ino)
    }

    /// Drops an open handle; the last hold of an unlinked inode frees it.
    pub async fn released(&self, ino: Ino, fh: u64) -> Result<(), Errno> {
        if self.release_handle(ino, fh) { self.reclaim_unheld(ino).await } else { Ok(()) }
    }

    /// Drops open handle `fh` of `ino` at once. Returns whether that was
    /// the last hold of an unlinked inode, which
    /// [`FileSystem::reclaim_unheld`] then frees.
    pub fn release_handle(&self, ino: Ino, fh: u64) -> bool {
        self.behind.close(fh);
        self.unhold(ino, |r| r.open = r.open.saturating_sub(1))
    }

    /// Records that a client (the kernel, for FUSE) was handed `ino` by a
    /// lookup, create or directory listing: it may use the inode number
    /// until it forgets it, even after the inode's last link is gone.
    pub fn looked_up(&self, ino: Ino) {
        self.refs().entry(ino).or_default().lookups += 1;
    }

    /// The client forgets `n` lookups of `ino` at once. Returns whether
    /// that was the last hold of an unlinked inode, which
    /// [`FileSystem::reclaim_unheld`] then frees.
    pub fn forget_lookups(&self, ino: Ino, n: u64) -> bool {
        self.unhold(ino, |r| r.lookups = r.lookups.saturating_sub(n))
    }

    /// Frees `ino`, an unlinked inode nobody holds any more (what
    /// [`FileSystem::release_handle`] and [`FileSystem::forget_lookups`]
    /// say), once its writes behind are done.
    pub async fn reclaim_unheld(&self, ino: Ino) -> Result<(), Errno> {
        self.settle(ino).await;
        self.reclaim(vec![ino]).await
    }

    /// Lets go of a hold on `ino` (`release` lowers its counts): whether it
    /// was the last hold of an unlinked inode.
    fn unhold(&self, ino: Ino, release: impl FnOnce(&mut Refs)) -> bool {
        {
            let mut refs = self.refs();
            let Some(r) = refs.get_mut(&ino) else { return false };
            release(r);
            if r.open != 0 || r.lookups != 0 {
                return false;
            }
            refs.remove(&ino);
        }
        self.forget_writer(ino);
        self.behind.forget(ino);
        self.meta.read(|s| s.getattr(ino).is_ok_and(|a| a.nlink == 0))
    }

    /// The lock of `ino`'s data.
    pub(super) fn writer(&self, ino: Ino) -> Arc<tokio::sync::RwLock<()>> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner()).entry(ino).or_default().clone()
    }

    /// Forgets `ino`'s data lock unless someone holds it.
    fn forget_writer(&self, ino: Ino) {
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if writers.get(&ino).is_some_and(|l| Arc::strong_count(l) == 1) {
            writers.remove(&ino);
        }
    }

    /// Reads up to `size` bytes at `offset` (fewer at the end of the file;
    /// holes read as zeros).
    pub async fn read(&self, ino: Ino, offset: u64, size: usize) -> Result<Vec<u8>, Errno> {
        self.settle(ino).await;
        let mut out = vec![0u8; size];
        let n = self.read_into(ino, offset, &mut out).await?;
        out.truncate(n);
        Ok(out)
    }

    /// Fills `out` with the file's bytes from `offset` on; returns how many
    /// lie within the file (the rest of `out` is left alone).
    async fn read_into(&self, ino: Ino, offset: u64, out: &mut [u8]) -> Result<usize, Errno> {
        if self.meta.read(|s| s.is_reduced(ino))? {
            return self.read_reduced(ino, offset, out).await;
        }
        // The ticket comes before the lookup: pages freed after it stay
        // untouched until this read is done.
        let _ticket = self.data.ticket();
        let (n, runs) = self.plan_read(ino, offset, out.len())?;
        let mut rest = &mut out[..n];
        let mut at = 0;
        let mut reads = Vec::with_capacity(runs.len());
        for (run, skip, range) in runs {
            let (hole, tail) = rest.split_at_mut(range.start - at);
            hole.fill(0);
            let (dst, tail) = tail.split_at_mut(range.len());
            reads.push(self.data.read(run, skip, dst));
            (rest, at) = (tail, range.end);
        }
        rest.fill(0);
        futures_util::future::try_join_all(reads).await?;
        Ok(n)
    }

    /// A read answered without a task, for a caller that is not one (FUSE's
    /// request threads): the pages are looked up on the caller's thread and
    /// read from a reactor, which calls `answer` with the bytes. `Err(answer)`
    /// if the file has writes behind (the read must wait for them) or is
    /// reduced; nothing was done then.
    pub fn try_read_now<A>(self: &Arc<Self>, ino: Ino, offset: u64, size: usize, answer: A) -> Result<(), A>
    where
        A: FnOnce(Result<&[u8], Errno>) + Send + 'static,
    {
        if self.writing(ino) {
            return Err(answer);
        }
        match self.meta.read(|s| s.is_reduced(ino)) {
            Ok(false) => {}
            Ok(true) => return Err(answer),
            Err(e) => {
                answer(Err(e));
                return Ok(());
            }
        }
        let ticket = Reading { seq: self.data.ticket().detach(), fs: self.clone() };
        let (n, runs) = match self.plan_read(ino, offset, size) {
            Ok(plan) => plan,
            Err(e) => {
                answer(Err(e));
                return Ok(());
            }
        };
        if runs.is_empty() {
            answer(Ok(&vec![0; n]));
            return Ok(());
        }
        self.data.read_then(runs, vec![0; n], move |read| {
            drop(ticket);
            answer(read.as_deref().map_err(|&e| e));
        });
        Ok(())
    }

    /// An `O_DIRECT` write of whole pages the file maps already, within its
    /// size, written over those pages in place from a reactor, which calls
    /// `answer` once the device has them: no pages allocated or freed, and
    /// no command unless the file's times must move ([`times_current`]);
    /// then one that sets them goes before the answer. `Err(answer)`
    /// (nothing done) for a write that needs new pages (holes, past the
    /// end, parts of pages), for files with writes behind (a later write
    /// must not land under their maps), reduced files, a file whose data
    /// lock would mean waiting, and near the end of the store's space.
    /// docs/fs.md, "Overwrites in place", says what a crash leaves.
    pub(super) fn try_overwrite<A>(
        self: &Arc<Self>,
        ino: Ino,
        offset: u64,
        data: &[u8],
        now: Time,
        answer: A,
    ) -> Result<(), A>
    where
        A: FnOnce(Result<(), Errno>) + Send + 'static,
    {
        let len = data.len() as u64;
        if len == 0 || offset % PAGE != 0 || len % PAGE != 0 || self.writing(ino) || self.data.metadata_space_low() {
            return Err(answer);
        }
        // Shared: truncates and punches, which free pages, wait for it.
        let Ok(held) = self.writer(ino).try_read_owned() else { return Err(answer) };
        // Pages an overwrite elsewhere lets go of meanwhile are not reused
        // before this write is done.
        let ticket = Reading { seq: self.data.ticket().detach(), fs: self.clone() };
        // Runs that cover every byte: pages a plain file maps, within its
        // size (past it, a reduced file's or anything but a file's, there
        // are fewer or none, or an error).
        let runs = match self.plan_read(ino, offset, data.len()) {
            Ok((n, runs)) if n == data.len() && runs.iter().map(|(_, _, r)| r.len()).sum::<usize>() == n => runs,
            _ => return Err(answer),
        };
        let Ok(current) = self.meta.read(|s| s.getattr(ino).map(|a| times_current(&a, now))) else {
            return Err(answer);
        };
        let end = offset + len;
        let mut writes = Vec::with_capacity(runs.len());
        for (run, _, range) in runs {
            let Ok(mut buf) = pmd::DmaBuf::new(range.len()) else { return Err(answer) };
            buf.copy_from_slice(&data[range]);
            writes.push((run, buf));
        }
        let fs = self.clone();
        self.data.write_then(writes, move |written| {
            drop(ticket);
            if written.is_err() || current {
                drop(held);
                return answer(written);
            }
            // The times, before the answer (the writer may stat next), with
            // the lock still held: no truncate comes between, which the
            // command's `end` would undo.
            let rt = fs.meta.runtime().clone();
            rt.spawn(async move {
                let set = fs.apply(Cmd::Write { ino, chunks: Vec::new(), end, now }).await;
                drop(held);
                answer(set.map(drop));
            });
        });
        Ok(())
    }

    /// Where a read of `len` bytes at `offset` finds them: how many lie
    /// within the file, and the runs of pool pages that hold them, each
    /// with the byte of its first page to start at and the bytes of the
    /// output it fills (the others are holes, zeros).
    fn plan_read(&self, ino: Ino, offset: u64, len: usize) -> Result<(usize, Vec<super::data::ReadRun>), Errno> {
        let (end, extents) = self.meta.read(|s| {
            let a = s.getattr(ino)?;
            if a.kind == super::FileKind::Dir {
                return Err(Errno::EISDIR);
            }
            let end = a.size.min(offset.saturating_add(len as u64));
            let extents: Vec<(u64, ChunkRef)> = if end > offset {
                s.extents(ino, offset / PAGE)?.take_while(|&(p, _)| p * PAGE < end).collect()
            } else {
                Vec::new()
            };
            Ok((end, extents))
        })?;
        if end <= offset {
            return Ok((0, Vec::new()));
        }
        let mut runs = Vec::new();
        let mut at = offset;
        for (first, c) in coalesce(extents) {
            // The bytes of this extent within [at, end).
            let (from, to) = (at.max(first * PAGE), end.min((first + u64::from(c.pages)) * PAGE));
            if to <= from {
                continue;
            }
            let skip = from - first * PAGE;
            let run = c.sub(skip / PAGE, (to - first * PAGE).div_ceil(PAGE) - skip / PAGE);
            runs.push((run, (skip % PAGE) as usize, (from - offset) as usize..(to - offset) as usize));
            at = to;
        }
        Ok(((end - offset) as usize, runs))
    }

    /// Writes `data` at `offset`; returns the file's attributes after.
    ///
    /// Writes of whole units go straight to new pages and run side by side;
    /// one that covers part of a unit reads the rest of it, so it runs
    /// alone (as do truncates and fallocate, which do the same).
    pub async fn write(&self, ino: Ino, offset: u64, data: &[u8], now: Time) -> Result<Attr, Errno> {
        let end = super::behind::write_end(offset, data)?;
        if data.is_empty() {
            return self.meta.read(|s| s.getattr(ino));
        }
        if let Some(policy) = self.meta.read(|s| s.reduce_policy(ino))? {
            return self.write_reduced(ino, offset, data, now, policy).await;
        }
        let (_held, staged) = self.stage_write(ino, offset, data, true).await?;
        let chunks = self.write_staged(staged).await?;
        self.map_written(chunks, |chunks| Cmd::Write { ino, chunks, end, now }).await
    }

    /// Takes the file's data lock for a write of `data` at `offset` and
    /// stages it ([`FileSystem::stage`]). Whole units share the lock, unless
    /// this write goes through while others are behind (it must come after
    /// them); part of a unit holds it alone.
    pub(super) async fn stage_write(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        through: bool,
    ) -> Result<(super::behind::Held, Vec<Staged>), Errno> {
        use super::behind::Held;
        let u = self.chunk_size;
        let end = offset + data.len() as u64;
        let lock = self.writer(ino);
        let whole = offset % u == 0 && end % u == 0 && !(through && self.writing(ino));
        let held = if whole { Held::Shared(lock.read_owned().await) } else { Held::Alone(lock.write_owned().await) };
        let size = self.file_size(ino, Errno::EINVAL)?;
        // Whole units from the one holding `offset`, up to the file's end
        // in the last (beyond it, the unit holds zeros).
        let from = offset / u * u;
        let to = end.max(size.min(end.next_multiple_of(u))).next_multiple_of(PAGE);
        Ok((held, self.stage(ino, from, to, offset..end, data).await?))
    }

    /// A regular file's size; a directory is EISDIR, anything else
    /// `not_a_file`.
    pub(super) fn file_size(&self, ino: Ino, not_a_file: Errno) -> Result<u64, Errno> {
        self.meta.read(|s| {
            let a = s.getattr(ino)?;
            match a.kind {
                super::FileKind::File => Ok(a.size),
                super::FileKind::Dir => Err(Errno::EISDIR),
                _ => Err(not_a_file),
            }
        })
    }

    /// New pages for the file's bytes `[from, to)` (`from` at a unit):
    /// `data` at `new.start`, zeros in the rest of `new`, what the file
    /// holds now elsewhere. Returns them as extents to map.
    async fn rewrite(
        &self,
        ino: Ino,
        from: u64,
        to: u64,
        new: std::ops::Range<u64>,
        data: &[u8],
    ) -> Result<Vec<(u64, ChunkRef)>, Errno> {
        let staged = self.stage(ino, from, to, new, data).await?;
        self.write_staged(staged).await
    }

    /// What [`FileSystem::rewrite`] does before the device writes: the new
    /// pages allocated and their contents in DMA memory.
    async fn stage(
        &self,
        ino: Ino,
        from: u64,
        to: u64,
        new: std::ops::Range<u64>,
        data: &[u8],
    ) -> Result<Vec<Staged>, Errno> {
        debug_assert!(from <= new.start && new.end <= to && data.len() as u64 <= new.end - new.start);
        let runs = self.alloc_pages((to - from).div_ceil(PAGE), self.chunk_size / PAGE).await?;
        let mut staged = self.stage_new(from, &new, data, runs)?;
        // What the file holds now in the rest of the runs.
        for s in &mut staged {
            let at = s.unit * self.chunk_size;
            let end = at + u64::from(s.run.pages) * PAGE;
            let (a, b) = (new.start.clamp(at, end), new.end.clamp(at, end));
            for part in [at..a, b..end].into_iter().filter(|p| !p.is_empty()) {
                let bytes = &mut s.buf[(part.start - at) as usize..(part.end - at) as usize];
                bytes.fill(0);
                if let Err(e) = self.read_into(ino, part.start, bytes).await {
                    self.data.free(staged.iter().map(|s| s.run));
                    return Err(e);
                }
            }
        }
        Ok(staged)
    }

    /// Buffers for `runs` (whole units, holding the file's bytes from
    /// `from` on) with `data` at `new.start` and zeros after it up to
    /// `new.end`; the rest of each buffer is the caller's to fill. If DMA
    /// memory runs out, the runs are free again.
    pub(super) fn stage_new(
        &self,
        from: u64,
        new: &std::ops::Range<u64>,
        data: &[u8],
        runs: Vec<ChunkRef>,
    ) -> Result<Vec<Staged>, Errno> {
        let mut staged = Vec::with_capacity(runs.len());
        let mut at = from;
        for &run in &runs {
            let end = at + u64::from(run.pages) * PAGE;
            let Ok(mut buf) = pmd::DmaBuf::new((end - at) as usize).inspect_err(|e| {
                tracing::error!("no DMA memory for a write of {} pages: {e}", run.pages);
            }) else {
                self.data.free(runs);
                return Err(Errno::EIO);
            };
            let (a, b) = (new.start.clamp(at, end), new.end.clamp(at, end));
            let bytes = &mut buf[(a - at) as usize..(b - at) as usize];
            let src = data.get((a - new.start) as usize..).unwrap_or_default();
            let n = src.len().min(bytes.len());
            bytes[..n].copy_from_slice(&src[..n]);
            bytes[n..].fill(0);
            staged.push(Staged { unit: at / self.chunk_size, run, buf });
            at = end;
        }
        Ok(staged)
    }

    /// Writes staged runs side by side; returns them as extents to map (if
    /// one fails, all their pages are free again).
    pub(super) async fn write_staged(&self, staged: Vec<Staged>) -> Result<Vec<(u64, ChunkRef)>, Errno> {
        let extents: Vec<(u64, ChunkRef)> = staged.iter().map(|s| (s.unit, s.run)).collect();
        let writes = staged.into_iter().map(|s| self.data.write(s.run, s.buf));
        if let Err(e) = futures_util::future::try_join_all(writes).await {
            self.data.free(extents.into_iter().map(|(_, c)| c));
            return Err(e);
        }
        Ok(extents)
    }

    /// Allocates `pages` pages in runs of whole `unit`s ([`DataPool::alloc`]).
    pub(super) async fn alloc_pages(&self, pages: u64, unit: u64) -> Result<Vec<ChunkRef>, Errno> {
        match self.data.alloc(pages, unit).await {
            // Space a delete let go of comes back once the delete is
            // durable: wait for that rather than fail.
            Err(Errno::ENOSPC) if self.data.frees_waiting() => {
                self.meta.sync().await?;
                self.data.alloc(pages, unit).await
            }
            r => r,
        }
    }

    /// Maps freshly written extents by the command `cmd` makes of them; if
    /// the command fails, their pages are free again.
    pub(super) async fn map_written(
        &self,
        chunks: Vec<(u64, ChunkRef)>,
        cmd: impl FnOnce(Vec<(u64, ChunkRef)>) -> Cmd,
    ) -> Result<Attr, Errno> {
        let pages: Vec<ChunkRef> = chunks.iter().map(|&(_, c)| c).collect();
        self.apply(cmd(chunks)).await.map(attributes).inspect_err(|_| self.data.free(pages))
    }

    /// Pages of the file mapped in `[offset, end)`.
    fn mapped(&self, ino: Ino, offset: u64, end: u64) -> Result<u64, Errno> {
        let (first, last) = (offset / PAGE, end.div_ceil(PAGE));
        self.meta.read(|s| {
            Ok(s.extents(ino, first)?
                .take_while(|&(p, _)| p < last)
                .map(|(p, c)| last.min(p + u64::from(c.pages)) - first.max(p))
                .sum())
        })
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
        let _alone = lock.write().await;
        let size = self.file_size(ino, Errno::ENODEV)?;
        let reduced = self.meta.read(|s| s.is_reduced(ino))?;
        let mut attr = None;
        if mode & (PUNCH | ZERO) != 0 && reduced {
            if offset < end.min(size) {
                attr = Some(self.punch_reduced(ino, offset, end.min(size), now).await?);
            }
        } else if reduced {
            // Reduced data takes what it compresses to: nothing to check ahead.
        } else if mode & (PUNCH | ZERO) != 0 {
            attr = Some(self.zero_range(ino, offset, end.min(size), size, now).await?);
        } else {
            // The pages the range's holes would take.
            let needed = end.div_ceil(PAGE) - offset / PAGE - self.mapped(ino, offset, end)?;
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
            None => self.meta.read(|s| s.getattr(ino)),
        }
    }

    /// Zeroes `[offset, end)` of a file of `size` bytes: whole units become
    /// holes, the units at the edges are rewritten.
    async fn zero_range(&self, ino: Ino, offset: u64, end: u64, size: u64, now: Time) -> Result<Attr, Errno> {
        let u = self.chunk_size;
        // Units wholly inside (the last unit counts whole if the range
        // reaches the end of the file).
        let first = offset.div_ceil(u);
        let last = if end == size { end.div_ceil(u) } else { end / u }.max(first);
        let mut edges = Vec::new();
        if offset < first * u && offset < end {
            edges.push((offset / u * u, offset..end.min(first * u)));
        }
        if last * u < end {
            edges.push((last * u, last * u..end));
        }
        let mut written: Vec<(u64, ChunkRef)> = Vec::new();
        for (from, new) in edges {
            let to = size.min(from + u).next_multiple_of(PAGE);
            let edge = match self.mapped(ino, from, to) {
                Ok(0) => continue,
                Ok(_) => self.rewrite(ino, from, to, new, &[]).await,
                Err(e) => Err(e),
            };
            match edge {
                Ok(runs) => written.extend(runs),
                Err(e) => {
                    // The other edge's pages are mapped by nothing.
                    self.data.free(written.into_iter().map(|(_, c)| c));
                    return Err(e);
                }
            }
        }
        self.map_written(written, |chunks| Cmd::PunchRange { ino, holes: (first, last), chunks, now }).await
    }

    /// Changes attributes, dropping `drop` with them if given (a change of
    /// owner or a truncate: [`DropPrivs`]); a size that cuts into a mapped
    /// page rewrites the unit holding it with its tail zeroed, in the same
    /// command as the size.
    pub async fn setattr(&self, ino: Ino, mut set: SetAttr, drop: Option<DropPrivs>, now: Time) -> Result<Attr, Errno> {
        let lock = self.writer(ino);
        let _alone = lock.write().await;
        let mut tail = None;
        if let Some(size) = set.size {
            let u = self.chunk_size;
            let (kind, old) = self.meta.read(|s| s.getattr(ino).map(|a| (a.kind, a.size)))?;
            let cuts_a_page = kind == super::FileKind::File && size < old && size % PAGE != 0;
            if cuts_a_page && self.mapped(ino, size - 1, size)? > 0 {
                let (from, to) = ((size - 1) / u * u, size.next_multiple_of(PAGE));
                let [(index, chunk)] = self.rewrite(ino, from, to, size..to, &[]).await?[..] else {
                    unreachable!("one unit is allocated as one run")
                };
                tail = Some(chunk);
                set.tail = Some((index, chunk));
            }
        }
        let cmd = match drop {
            None => Cmd::SetAttr { ino, set, now },
            Some(drop) => Cmd::SetAttrDropping { ino, set, drop, now },
        };
        self.apply(cmd).await.map(attributes).inspect_err(|_| self.data.free(tail))
    }

    /// What a write of `ino` takes away ([`DropPrivs`]), if it holds any of
    /// it: to run before the write. Whether there is anything to drop is a
    /// cheap test ([`FileSystem::would_drop`]).
    pub async fn drop_privs(&self, ino: Ino, drop: DropPrivs, now: Time) -> Result<(), Errno> {
        if !self.would_drop(ino, drop)? {
            return Ok(());
        }
        self.apply(Cmd::SetAttrDropping { ino, set: SetAttr::default(), drop, now }).await.map(|_| ())
    }

    /// Whether `ino` holds anything of `drop`.
    pub fn would_drop(&self, ino: Ino, drop: DropPrivs) -> Result<bool, Errno> {
        self.meta.read(|s| s.would_drop(ino, drop))
    }

    /// Makes everything written so far durable: file data, then metadata
    /// (what `fsync` of any file or directory promises).
    pub async fn sync(&self) -> Result<(), Errno> {
        self.settle_all().await;
        self.data.flush().await?;
        self.meta.sync().await
    }

    /// Makes everything durable, stops the metadata group and closes the
    /// file system's blobs (so the store can be unloaded cleanly).
    pub async fn shutdown(&self) -> Result<(), Errno> {
        self.stop_gc().await;
        self.sync().await?;
        self.meta.shutdown().await?;
        self.pool.close("data pool").await
    }
}

/// New pages of a file, their contents ready to be written.
pub(super) struct Staged {
    /// The file's unit the run starts at.
    pub(super) unit: u64,
    pub(super) run: ChunkRef,
    pub(super) buf: pmd::DmaBuf,
}

/// A read's ticket ([`DataPool::ticket`]) while it finishes on a reactor.
struct Reading {
    fs: Arc<FileSystem>,
    seq: u64,
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.fs.data.end_read(self.seq);
    }
}

/// The granularity of the times writes set: a write leaves a file's times
/// alone when both were set within the same 4 ms as it (at or after the
/// start of that span, not after the write), as Linux's local file systems
/// take a write's time from the coarse clock, which moves once a tick
/// (4 ms at Debian's 250 Hz).
const TIMES_TICK: i64 = 4_000_000;

/// Whether a write at `now` leaves `a`'s modification and change times as
/// they are ([`TIMES_TICK`]).
fn times_current(a: &Attr, now: Time) -> bool {
    let tick = Time(now.0 - now.0.rem_euclid(TIMES_TICK));
    [a.mtime, a.ctime].into_iter().all(|t| tick <= t && t <= now)
}

/// What clients hold of an inode.
#[derive(Debug, Default)]
struct Refs {
    /// Open handles.
    open: u32,
    /// Lookups not yet forgotten.
    lookups: u64,
}

/// The attributes a command changing one inode (write, setattr, punch)
/// replies with.
pub(super) fn attributes(reply: Reply) -> Attr {
    match reply {
        Reply::Attr(a, _) => a,
        r => unreachable!("a command changing one inode replies with attributes, not {r:?}"),
    }
}

/// Extents whose pages follow each other in the file and in the pool, as
/// one (fewer, larger reads).
fn coalesce(extents: Vec<(u64, ChunkRef)>) -> Vec<(u64, ChunkRef)> {
    let mut out: Vec<(u64, ChunkRef)> = Vec::with_capacity(extents.len());
    for (p, c) in extents {
        match out.last_mut() {
            Some((q, d))
                if *q + u64::from(d.pages) == p
                    && d.blob == c.blob
                    && d.page + u64::from(d.pages) == c.page
                    && u64::from(d.pages) + u64::from(c.pages) <= u64::from(u32::MAX) =>
            {
                d.pages += c.pages
            }
            _ => out.push((p, c)),
        }
    }
    out
}

/// Where the master key of encrypted data comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A key file: 32 raw bytes or 64 hex digits.
    File(std::path::PathBuf),
    /// A passphrase, stretched by Argon2id with parameters the file system
    /// keeps (made the first time).
    Passphrase(Vec<u8>),
}

/// The root blob's xattr holding a check value of the master key.
const KEY_CHECK_XATTR: &str = "claudefs.fs.key_check";
/// The root blob's xattr holding the Argon2id parameters (postcard).
const KDF_XATTR: &str = "claudefs.fs.kdf";

/// The scope keys of the file system (scope 0: one volume), from `key`
/// checked against the check value the root blob keeps in its `xattrs`
/// (set the first time a key is given).
async fn master_key(
    store: &Blobstore,
    root: u64,
    xattrs: &std::collections::BTreeMap<String, Vec<u8>>,
    key: Option<KeySource>,
) -> Result<crate::reduce::ScopeKeys, BlobError> {
    use crate::reduce::{KdfParams, MasterKey, ScopeKeys};
    let invalid = |reason: String| BlobError::Invalid { what: "master key", reason };
    let check = xattrs.get(KEY_CHECK_XATTR);
    let master = match key {
        None if check.is_some() => {
            return Err(invalid(
                "this file system holds a master key for encrypted data; give it (a key file or a passphrase)".into(),
            ));
        }
        None => return Ok(ScopeKeys::unencrypted(0)),
        Some(KeySource::File(path)) => MasterKey::from_key_file(&path).map_err(|e| invalid(e.to_string()))?,
        Some(KeySource::Passphrase(p)) => {
            let params = match xattrs.get(KDF_XATTR) {
                Some(json) => postcard::from_bytes::<KdfParams>(json).map_err(|e| BlobError::Corrupt {
                    location: format!("file system root blob, xattr {KDF_XATTR}"),
                    reason: e.to_string(),
                })?,
                None => {
                    let params = KdfParams::generate();
                    let json = postcard::to_stdvec(&params).expect("KdfParams serialise");
                    store.set_xattr(root, KDF_XATTR, &json).await?;
                    params
                }
            };
            MasterKey::from_passphrase(&p, &params).map_err(|e| invalid(e.to_string()))?
        }
    };
    // A keyed hash of a fixed text, in a scope no data uses: tells keys
    // apart without saying anything about them.
    let value = master.scope(u64::MAX).hash(true, b"claudefs master key check").map_err(|e| invalid(e.to_string()))?;
    match check {
        Some(c) if c.as_slice() != value.0.as_slice() => {
            return Err(invalid(
                "the key given is not the one this file system's encrypted data was written with".into(),
            ));
        }
        Some(_) => {}
        None => {
            store.set_xattr(root, KEY_CHECK_XATTR, &value.0).await?;
            store.sync_blob(root).await?;
        }
    }
    Ok(master.scope(0))
}
