//! Write-behind: a buffered write is answered once its bytes are copied
//! into DMA memory and its pages allocated; the device write and the
//! command that maps the pages finish behind the reply, as the kernel's
//! page cache does for a local file system. A writer then keeps several
//! device writes in flight instead of waiting for each one.
//!
//! What keeps it correct:
//!
//! - Each write behind holds its file's data lock (shared for whole units,
//!   alone for part of one) until its pages are mapped, so truncates,
//!   fallocate, partial writes and [`FileSystem::settle`] wait for it.
//! - A file's writes behind map their pages in the order they were
//!   answered, so the later of two writes to the same bytes wins.
//! - Anything that reads a file's data or attributes settles it first
//!   ([`FileSystem::writing`] is the cheap test for whether it must).
//! - Space is allocated before the reply, so ENOSPC is the write's own
//!   error. A device or metadata error after the reply is kept for the
//!   file and returned, once to each open file (handle) that was open
//!   when it happened or opens before anyone has seen it, by that handle's
//!   next `fsync`, or by its close if the error came first and the client
//!   asks at close ([`FileSystem::write_error`]: a close does not wait for
//!   writes behind; the FUSE mount asks only with the writeback cache), as
//!   the kernel's errseq reports writeback errors.
//! - Near the end of the store's space, and for reduced files, writes go
//!   through as before.
//! - At most [`BUDGET`] bytes are behind at once; beyond it a write waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, OwnedSemaphorePermit, Semaphore, oneshot};

use super::files::{FileSystem, Staged};
use super::{ChunkRef, Cmd, Errno, Ino, Time};
use crate::format::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Bytes of writes that may be behind their replies at once.
pub const BUDGET: usize = 64 << 20;

/// The writes of each file that are behind their replies.
pub(super) struct Behind {
    files: Mutex<HashMap<Ino, File>>,
    /// Errors of writes behind, per file, and what each open handle has
    /// been told of them.
    errors: Mutex<Errors>,
    /// Permits of 4 KiB: [`BUDGET`] in all.
    budget: Arc<Semaphore>,
}

#[derive(Default)]
struct File {
    in_flight: usize,
    /// Closed once the latest write behind has mapped its pages (or
    /// failed): the next one maps after it.
    tail: Option<oneshot::Receiver<()>>,
}

/// Write-behind errors as the kernel's errseq keeps writeback errors: a
/// file counts its errors; a handle remembers the count it has been told
/// of (or, opened after an error nobody has seen yet, one short of it).
#[derive(Default)]
struct Errors {
    files: HashMap<Ino, FileErrors>,
    /// Open handles: the file and the errors they have been told of.
    handles: HashMap<u64, (Ino, u64)>,
    next: u64,
}

#[derive(Default)]
struct FileErrors {
    /// Errors so far.
    count: u64,
    /// The latest.
    last: Option<Errno>,
    /// Whether a handle has been told of the latest.
    seen: bool,
}

/// A file's data lock as a write holds it.
pub(super) enum Held {
    Shared(#[allow(dead_code, reason = "held until dropped")] OwnedRwLockReadGuard<()>),
    Alone(#[allow(dead_code, reason = "held until dropped")] OwnedRwLockWriteGuard<()>),
}

impl Behind {
    pub(super) fn new() -> Behind {
        Behind { files: Mutex::default(), errors: Mutex::default(), budget: Arc::new(Semaphore::new(BUDGET / 4096)) }
    }

    fn errors(&self) -> std::sync::MutexGuard<'_, Errors> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new handle of `ino`: it will be told of errors from now on, and of
    /// one nobody has been told of yet.
    pub(super) fn open(&self, ino: Ino) -> u64 {
        let mut e = self.errors();
        let told = e.files.get(&ino).map_or(0, |f| if f.seen { f.count } else { f.count.saturating_sub(1) });
        e.next += 1;
        let fh = e.next;
        e.handles.insert(fh, (ino, told));
        fh
    }

    /// Forgets a closed handle.
    pub(super) fn close(&self, fh: u64) {
        self.errors().handles.remove(&fh);
    }

    /// Forgets `ino`'s errors (the client has forgotten the inode).
    pub(super) fn forget(&self, ino: Ino) {
        self.errors().files.remove(&ino);
    }

    /// The latest error of `fh`'s file that `fh` has not been told of.
    fn check(&self, fh: u64) -> Option<Errno> {
        let e = &mut *self.errors();
        let (ino, told) = e.handles.get_mut(&fh)?;
        let f = e.files.get_mut(ino)?;
        if f.count == *told {
            return None;
        }
        *told = f.count;
        f.seen = true;
        f.last
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, File>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writing(&self, ino: Ino) -> bool {
        self.files().get(&ino).is_some_and(|f| f.in_flight > 0)
    }

    /// Files with writes behind.
    fn inodes(&self) -> Vec<Ino> {
        self.files().iter().filter(|(_, f)| f.in_flight > 0).map(|(&i, _)| i).collect()
    }

    /// Counts a write of `ino` going behind: returns what to wait for before
    /// mapping (the file's previous write behind) and what to close after.
    fn start(&self, ino: Ino) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        let (done, tail) = oneshot::channel();
        let mut files = self.files();
        let f = files.entry(ino).or_default();
        f.in_flight += 1;
        (f.tail.replace(tail), done)
    }

    /// A write behind of `ino` is done with `result`.
    fn end(&self, ino: Ino, result: Result<(), Errno>) {
        if let Err(e) = result {
            let mut errors = self.errors();
            let f = errors.files.entry(ino).or_default();
            (f.count, f.last, f.seen) = (f.count + 1, Some(e), false);
        }
        let mut files = self.files();
        let Some(f) = files.get_mut(&ino) else { return };
        f.in_flight -= 1;
        if f.in_flight == 0 {
            files.remove(&ino);
        }
    }
}

impl FileSystem {
    /// Writes `data` at `offset` like [`FileSystem::write`], but returns as
    /// soon as the bytes are copied and their pages allocated; the rest
    /// finishes behind (the module's description says what that promises).
    pub async fn write_behind(self: &Arc<Self>, ino: Ino, offset: u64, data: &[u8], now: Time) -> Result<(), Errno> {
        let end = write_end(offset, data)?;
        if self.writes_through(ino, data)? {
            return self.write(ino, offset, data, now).await.map(drop);
        }
        let permits = self
            .behind
            .budget
            .clone()
            .acquire_many_owned(budget_pages(data))
            .await
            .expect("the budget is never closed");
        let (held, staged) = self.stage_write(ino, offset, data, false).await?;
        self.go_behind(
            StagedWrite { ino, offset, end, now, held, staged, back: Vec::new(), permits },
            &Handle::current(),
            None,
        );
        Ok(())
    }

    /// A write of whole units without a task, for a caller that is not one
    /// (FUSE's request threads): staged straight from `data` into DMA
    /// memory. A buffered write (`direct` false) is answered at once and
    /// finishes behind on the metadata thread ([`super::raft::MetaRaft::runtime`], where
    /// its command needs no hand-off), as [`FileSystem::write_behind`] does.
    /// An O_DIRECT one over pages the file maps goes over them in place
    /// when it can (`FileSystem::try_overwrite`); otherwise it is written
    /// to new pages from a reactor, which calls `answer` once the device
    /// has the bytes, and the command that maps them follows there
    /// behind the answer, in the file's order of writes behind, with their
    /// rules (the module's description): reads settle first, and an error
    /// of the mapping is kept for fsync or close. `Err(answer)` if staging
    /// would mean waiting (`try_stage`); nothing was done then.
    pub fn try_write_now<A>(
        self: &Arc<Self>,
        ino: Ino,
        offset: u64,
        data: &[u8],
        now: Time,
        direct: bool,
        answer: A,
    ) -> Result<(), A>
    where
        A: FnOnce(Result<(), Errno>) + Send + 'static,
    {
        let answer = if direct {
            match self.try_overwrite(ino, offset, data, now, answer) {
                Ok(()) => return Ok(()),
                Err(answer) => answer,
            }
        } else {
            answer
        };
        let rt = self.meta.runtime();
        match self.try_stage(ino, offset, data, now) {
            None => return Err(answer),
            Some(Err(e)) => answer(Err(e)),
            Some(Ok(w)) if direct => self.go_behind(w, rt, Some(Box::new(answer))),
            Some(Ok(w)) => {
                self.go_behind(w, rt, None);
                answer(Ok(()));
            }
        }
        Ok(())
    }

    /// Stages a write of whole units from `data` without waiting: `None` if
    /// it would have to wait for the file's lock, for the budget, for a read
    /// of the other bytes of a unit it covers in part, or for space a delete
    /// is letting go of; nothing was done then.
    fn try_stage(
        self: &Arc<Self>,
        ino: Ino,
        offset: u64,
        data: &[u8],
        now: Time,
    ) -> Option<Result<StagedWrite, Errno>> {
        let end = match write_end(offset, data) {
            Ok(end) => end,
            Err(e) => return Some(Err(e)),
        };
        let unit = self.chunk_size;
        if offset % unit != 0 || end % unit != 0 {
            return None;
        }
        match self.writes_through(ino, data) {
            Ok(false) => {}
            Ok(true) => return None,
            Err(e) => return Some(Err(e)),
        }
        let permits = self.behind.budget.clone().try_acquire_many_owned(budget_pages(data)).ok()?;
        let held = Held::Shared(self.writer(ino).try_read_owned().ok()?);
        if let Err(e) = self.file_size(ino, Errno::EINVAL) {
            return Some(Err(e));
        }
        let (runs, back) = match self.data.take((end - offset) / PAGE, unit / PAGE) {
            Ok(taken) => taken,
            Err(Errno::ENOSPC) if self.data.frees_waiting() => return None,
            Err(e) => return Some(Err(e)),
        };
        Some(self.stage_new(offset, &(offset..end), data, runs).map(|staged| StagedWrite {
            ino,
            offset,
            end,
            now,
            held,
            staged,
            back,
            permits,
        }))
    }

    /// Whether a write of `data` to `ino` goes through rather than behind:
    /// an empty one, one to a reduced file, and every write near the end of
    /// the store's space.
    fn writes_through(&self, ino: Ino, data: &[u8]) -> Result<bool, Errno> {
        Ok(data.is_empty() || self.data.metadata_space_tight() || self.meta.read(|s| s.reduce_policy(ino))?.is_some())
    }

    /// Counts a staged write as behind and finishes it: backs the pool
    /// clusters it needs, writes the device, calls `answer` (if the write
    /// was not answered yet) with the device's result, then, after the
    /// file's previous write behind, runs the command that maps its pages,
    /// on `rt`. With nothing to back, a write to answer goes from a reactor
    /// and is answered there.
    fn go_behind(self: &Arc<Self>, mut w: StagedWrite, rt: &Handle, answer: Option<Answer>) {
        let (previous, done) = self.behind.start(w.ino);
        let fs = self.clone();
        match answer {
            Some(answer) if w.back.is_empty() => {
                let staged = std::mem::take(&mut w.staged);
                let extents: Vec<(u64, ChunkRef)> = staged.iter().map(|s| (s.unit, s.run)).collect();
                let rt = rt.clone();
                let runs = staged.into_iter().map(|s| (s.run, s.buf)).collect();
                self.data.write_then(runs, move |written| {
                    if written.is_err() {
                        fs.data.free(extents.iter().map(|&(_, c)| c));
                    }
                    answer(written);
                    rt.spawn(async move { fs.map_behind(w, previous, done, written.map(|()| extents), true).await });
                });
            }
            answer => {
                rt.spawn(async move {
                    fs.data.back(std::mem::take(&mut w.back)).await;
                    let written = fs.write_staged(std::mem::take(&mut w.staged)).await;
                    let answered = answer.map(|answer| answer(written.as_ref().map(drop).map_err(|&e| e))).is_some();
                    fs.map_behind(w, previous, done, written, answered).await
                });
            }
        }
    }

    /// The end of a write behind, in the file's order: once the previous
    /// write behind is done, maps what was `written` and counts this one
    /// done. An error is kept for fsync or the next close, unless it is a
    /// device error the write's answer carried (`answered`).
    async fn map_behind(
        self: &Arc<Self>,
        w: StagedWrite,
        previous: Option<oneshot::Receiver<()>>,
        done: oneshot::Sender<()>,
        written: Result<Vec<(u64, ChunkRef)>, Errno>,
        answered: bool,
    ) {
        let StagedWrite { ino, offset, end, now, held, permits, .. } = w;
        if let Some(previous) = previous {
            // Closed or dropped: either way it is done.
            let _ = previous.await;
        }
        let result = match written {
            Ok(chunks) => self.map_written(chunks, |chunks| Cmd::Write { ino, chunks, end, now }).await.map(drop),
            Err(_) if answered => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!(
                "a write behind of inode {ino} at offset {offset} failed: {e}; fsync or the next close reports it"
            );
        }
        self.behind.end(ino, result);
        drop((done, held, permits));
    }

    /// Whether writes of `ino` are still finishing behind their replies:
    /// its data and attributes are then not yet what the writer was told.
    pub fn writing(&self, ino: Ino) -> bool {
        self.behind.writing(ino)
    }

    /// Waits until every write of `ino` answered so far has mapped its pages.
    pub async fn settle(&self, ino: Ino) {
        if self.writing(ino) {
            // Writes behind hold the lock until they are mapped.
            drop(self.writer(ino).write().await);
        }
    }

    /// `ino`'s attributes once its writes are settled.
    pub async fn settled_attr(&self, ino: Ino) -> Result<super::Attr, Errno> {
        self.settle(ino).await;
        self.meta.read(|s| s.getattr(ino))
    }

    /// Waits for the writes of every file ([`FileSystem::settle`]).
    pub(super) async fn settle_all(&self) {
        for ino in self.behind.inodes() {
            self.settle(ino).await;
        }
    }

    /// `ino`'s writes settled, and the error one of them met after its
    /// reply that handle `fh` of it has not been told of, if any.
    pub async fn flush(&self, ino: Ino, fh: u64) -> Result<(), Errno> {
        self.settle(ino).await;
        self.write_error(fh)
    }

    /// The error a write behind met after its reply that handle `fh` has
    /// not been told of, if any (each handle is told once: the module's
    /// description), without waiting for the writes still behind: what
    /// `close` reports (flush-behind).
    pub fn write_error(&self, fh: u64) -> Result<(), Errno> {
        self.behind.check(fh).map_or(Ok(()), Err)
    }

    /// `fsync` of `ino`: its writes settled and everything durable, then
    /// what [`FileSystem::write_error`] tells `fh`, given the handle the
    /// fsync came through.
    pub async fn fsync(&self, ino: Ino, fh: Option<u64>) -> Result<(), Errno> {
        self.settle(ino).await;
        self.sync().await?;
        fh.map_or(Ok(()), |fh| self.write_error(fh))
    }
}

/// Answers a write (FUSE's reply) with its result.
type Answer = Box<dyn FnOnce(Result<(), Errno>) + Send>;

/// A staged write on its way behind ([`FileSystem::go_behind`]).
struct StagedWrite {
    ino: Ino,
    offset: u64,
    end: u64,
    now: Time,
    held: Held,
    staged: Vec<Staged>,
    /// Pool clusters to back before the device writes.
    back: Vec<u64>,
    permits: OwnedSemaphorePermit,
}

/// Permits (4 KiB each) a write of `data` takes from the budget.
fn budget_pages(data: &[u8]) -> u32 {
    data.len().div_ceil(4096).min(BUDGET / 4096) as u32
}

/// Where a write of `data` at `offset` ends; EFBIG past the largest file.
pub(super) fn write_end(offset: u64, data: &[u8]) -> Result<u64, Errno> {
    offset.checked_add(data.len() as u64).filter(|&e| e <= super::types::FILE_SIZE_MAX).ok_or(Errno::EFBIG)
}
