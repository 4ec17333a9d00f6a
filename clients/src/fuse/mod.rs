//! The FUSE gateway: the kernel's requests answered from a [`FileSystem`].
//!
//! Requests arrive through a [`Session`] of our own ([`session`], over the
//! wire format of [`proto`]): on io_uring, one queue per CPU served by a
//! thread pinned there, where the kernel offers it, else by threads reading
//! `/dev/fuse`. Whatever thread receives a request answers on the spot what
//! needs no waiting: metadata reads from the replicated state, creates and
//! unlinks that cannot fail, closes, and buffered writes that can be staged
//! at once. Reads, and O_DIRECT writes that can be staged at once, are
//! answered by the reactor that does their I/O. Metadata changes, and the
//! maps of writes behind, run as tasks on the metadata group's thread, the
//! rest of the data path as tasks on a tokio runtime; each replies when
//! done, so a slow request never holds a request thread, and every hand-off
//! to another thread is a wake-up that costs more than most commands
//! (docs/PERFORMANCE.md). Permissions are the
//! kernel's job (`default_permissions`). Attributes and entries are cached by the kernel
//! for [`TTL`]: every change goes through this mount, which is the only
//! client of a single-node file system, so what the kernel caches is what
//! the file system holds. For the same reason writes may go through the
//! kernel's writeback cache (a mount option, off by default): the kernel
//! then keeps the size and times of a file with dirty pages and writes the
//! pages back in large, concurrent requests; `fsync` writes them back and
//! then syncs the file system. O_DIRECT bypasses the cache, and its
//! asynchronous requests reach us concurrently. Buffered writes are written
//! behind their replies ([`FileSystem::write_behind`]); requests that read
//! a file's data or attributes wait for its writes behind first.
//!
//! The kernel may use an inode number it was handed (by a lookup, a create
//! or a directory listing) until it forgets it, even after the inode's last
//! link is gone: every such reply counts a lookup, and an unlinked inode is
//! reclaimed only once it is neither open nor looked up.

pub mod proto;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use blobfs::fs::{
    Attr, Cmd, Creator, DropPrivs, Errno, FileKind, FileSystem, RenameMode, Reply as FsReply, SetAttr, Time, XattrMode,
};
use proto::{Header, Op, fattr, fopen, init};
pub use session::{Handler, MountOptions, Reply, Session};

/// How long the kernel may cache attributes and entries.
pub const TTL: Duration = Duration::from_secs(1);

/// The largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;

/// How files are opened:
/// - direct writes (O_DIRECT) may run side by side; the file system orders
///   what must be ordered ([`FileSystem::write`]);
/// - no FLUSH on close: without the writeback cache the kernel holds
///   nothing a close must write, and ClaudeFS's close does not wait for
///   writes behind either, so the round trip would only report an error a
///   write behind met before the close. That error goes where a local
///   file system's writeback error goes: to the next `fsync` of a handle
///   not yet told of it (docs/fs.md, "Write-behind"). With the writeback
///   cache the kernel ignores the flag and flushes on every close
///   (`Op::Flush` in [`Fuse`]'s [`Handler::dispatch`]).
pub const OPEN_FLAGS: u32 = fopen::PARALLEL_DIRECT_WRITES | fopen::NOFLUSH;

/// Share of the system's dirty-page limit the mount may hold, in percent.
/// The kernel gives a FUSE mount 1% (with a strict limit), which stalls a
/// writer after a few MiB of the writeback cache; ClaudeFS's server is
/// trusted (root), so it may hold as much as a local disk would.
const DIRTY_RATIO: u32 = 20;

/// Readahead of the mount, in KiB: one largest request.
const READAHEAD_KB: u32 = MAX_WRITE / 1024;

/// Sets the writeback and readahead limits of the mount on `path` (whose
/// kernel defaults are far below what a local disk gets: `DIRTY_RATIO`).
/// A limit that cannot be set is logged, and the mount works on with the
/// kernel's.
pub fn tune(path: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(path) {
        Ok(m) => m.dev(),
        Err(e) => return tracing::warn!("{}: cannot find the mount's device to tune it: {e}", path.display()),
    };
    let bdi = format!("/sys/class/bdi/{}:{}", libc::major(dev), libc::minor(dev));
    for (name, value) in [("max_ratio", DIRTY_RATIO), ("read_ahead_kb", READAHEAD_KB)] {
        let file = format!("{bdi}/{name}");
        if let Err(e) = std::fs::write(&file, value.to_string()) {
            tracing::warn!("{}: setting {file} to {value}: {e}; the kernel's default stays", path.display());
        }
    }
}

/// A FUSE file system over a [`FileSystem`].
pub struct Fuse {
    fs: Arc<FileSystem>,
    rt: tokio::runtime::Handle,
    writeback_cache: bool,
}

impl Fuse {
    /// Serves `fs`, running its work on `rt`, with the kernel's writeback
    /// cache if `writeback_cache` (docs/fs.md says when it is safe).
    pub fn new(fs: Arc<FileSystem>, rt: tokio::runtime::Handle, writeback_cache: bool) -> Fuse {
        Fuse { fs, rt, writeback_cache }
    }

    /// Runs `f` as a task with the file system.
    fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<FileSystem>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fs = self.fs.clone();
        self.rt.spawn(async move { f(fs).await });
    }

    /// Runs `f`, which changes metadata, as a task on the metadata group's
    /// own thread ([`blobfs::fs::MetaRaft::runtime`]): its command then
    /// reaches the group and its reply comes back without waking another
    /// thread.
    fn spawn_meta<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<FileSystem>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fs = self.fs.clone();
        self.fs.meta().runtime().spawn(async move { f(fs).await });
    }
}

/// What a truncate or fallocate by `h`'s caller takes away: the set-ID
/// bits too unless it has CAP_FSETID. A truncate says so itself
/// ([`fattr::KILL_SUIDGID`]); for a fallocate root is taken to have it.
fn drops_of(h: &Header) -> DropPrivs {
    if h.uid == 0 { DropPrivs::Caps } else { DropPrivs::All }
}

fn now() -> Time {
    Time::now()
}

fn creator(h: &Header) -> Creator {
    Creator { uid: h.uid, gid: h.gid, now: now() }
}

/// Replies with an entry, counting the kernel's lookup of it first (it may
/// forget it as soon as it has the reply) unless `counted` already.
fn reply_entry(fs: &FileSystem, reply: Reply, r: Result<FsReply, Errno>, counted: bool) {
    match r {
        Ok(FsReply::Entry(a)) => {
            if !counted {
                fs.looked_up(a.ino);
            }
            reply.entry(&a)
        }
        Ok(other) => {
            tracing::error!("fuse: an entry was expected, the file system replied {other:?}");
            reply.error(libc::EIO)
        }
        Err(e) => reply.error(e.0),
    }
}

/// Replies to readdir(plus) with `entries` (and their attributes if
/// `plus`; entries gone since are left out), as many as fit in `size`.
fn reply_dir(fs: &FileSystem, reply: Reply, entries: Vec<blobfs::fs::DirEntry>, size: u32, plus: bool) {
    let attrs: Vec<Option<Attr>> = match plus {
        true => fs.meta().read(|s| entries.iter().map(|e| s.getattr(e.ino).ok()).collect()),
        false => Vec::new(),
    };
    let mut out = Vec::with_capacity(size as usize);
    for (i, e) in entries.iter().enumerate() {
        let with = match plus {
            true => match &attrs[i] {
                Some(a) => Some((a, TTL)),
                None => continue,
            },
            false => None,
        };
        if !proto::put_dirent(&mut out, size as usize, e.ino, e.cookie, e.kind, &e.name, with) {
            break;
        }
        // The kernel takes a lookup of every entry of a readdirplus but `.`
        // and `..`.
        if plus && e.name != b"." && e.name != b".." {
            fs.looked_up(e.ino);
        }
    }
    reply.data(&out)
}

fn reply_empty(reply: Reply, r: Result<impl Sized, Errno>) {
    match r {
        Ok(_) => reply.ok(),
        Err(e) => reply.error(e.0),
    }
}

/// Replies to getxattr or listxattr: the size `v` needs if `size` is 0,
/// else `v` if it fits.
fn reply_xattr(reply: Reply, r: Result<Vec<u8>, Errno>, size: u32) {
    match r {
        Ok(v) if size == 0 => reply.xattr_size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(libc::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(e.0),
    }
}

/// A regular file may be created ahead of its apply
/// ([`FileSystem::create_ahead`]): lookups, attributes, listings, opens and
/// closes see it at once; every handler that asks more of an inode, or
/// changes it, first waits until the state has it ([`FileSystem::created`],
/// microseconds, and nothing when the inode is not one of those).
impl Handler for Fuse {
    fn flags(&self) -> u64 {
        // Each is taken only if the kernel offers it: an older kernel
        // without one still mounts.
        let flags = init::DO_READDIRPLUS
            | init::PARALLEL_DIROPS
            | init::POSIX_ACL
            // Asynchronous direct I/O reaches us as concurrent requests.
            | init::ASYNC_DIO
            // We drop set-ID bits and capabilities on writes, truncates and
            // changes of owner (`DropPrivs`), so the kernel need not ask for
            // `security.capability` before every write: without this a
            // GETXATTR round trip, under the inode's lock, went ahead of
            // each write (4 KiB random writes: 37 k -> 50 k IOPS).
            | init::HANDLE_KILLPRIV_V2;
        match self.writeback_cache {
            true => flags | init::WRITEBACK_CACHE,
            false => flags,
        }
    }

    fn dispatch(&self, h: &Header, op: Op<'_>, reply: Reply) {
        let ino = h.nodeid;
        match op {
            Op::Lookup { name } => self.lookup(ino, name, reply),
            Op::Forget { nlookup } => self.forget(ino, nlookup),
            Op::BatchForget { items } => proto::forgets(items).for_each(|(ino, n)| self.forget(ino, n)),
            Op::Getattr => self.getattr(ino, reply),
            Op::Setattr(s) => self.setattr(h, s, reply),
            Op::Readlink => {
                self.fs.created(ino);
                reply_data(reply, self.fs.meta().read(|s| s.readlink(ino).map(<[u8]>::to_vec)))
            }
            Op::Mknod { name, mode, rdev, umask } => {
                let Some(kind) = FileKind::from_mode(mode).filter(|k| !matches!(k, FileKind::Dir | FileKind::Symlink))
                else {
                    return reply.error(libc::EINVAL);
                };
                let cmd = Cmd::Mknod {
                    parent: ino,
                    name: name.to_vec(),
                    kind,
                    perm: mode & !umask & 0o7777,
                    rdev,
                    by: creator(h),
                };
                self.apply_entry(cmd, reply)
            }
            Op::Mkdir { name, mode, umask } => {
                let cmd = Cmd::Mkdir { parent: ino, name: name.to_vec(), perm: mode & !umask & 0o7777, by: creator(h) };
                self.apply_entry(cmd, reply)
            }
            Op::Symlink { name, target } => self.apply_entry(
                Cmd::Symlink { parent: ino, name: name.to_vec(), target: target.to_vec(), by: creator(h) },
                reply,
            ),
            Op::Unlink { name } => self.unlink(ino, name, reply),
            Op::Rmdir { name } => self.apply_empty(Cmd::Rmdir { parent: ino, name: name.to_vec(), now: now() }, reply),
            Op::Rename { name, newdir, newname, flags } => {
                let mode = match flags {
                    0 => RenameMode::Replace,
                    libc::RENAME_EXCHANGE => RenameMode::Exchange,
                    libc::RENAME_NOREPLACE => RenameMode::NoReplace,
                    _ => return reply.error(libc::EINVAL),
                };
                let (name, new_name) = (name.to_vec(), newname.to_vec());
                self.apply_empty(
                    Cmd::Rename { parent: ino, name, new_parent: newdir, new_name, mode, now: now() },
                    reply,
                )
            }
            Op::Link { ino: target, name } => self.link(target, ino, name, reply),
            Op::Open { .. } => self.open(ino, reply),
            Op::Create { name, mode, umask, .. } => self.create(h, name, mode & !umask & 0o7777, reply),
            Op::Read { offset, size, .. } => self.read(ino, offset, size, reply),
            Op::Write { offset, data, write_flags, flags, .. } => {
                self.write(ino, offset, data, write_flags, flags, reply)
            }
            Op::Fallocate { offset, length, mode } => self.fallocate(h, offset, length, mode, reply),
            // Sent only with the writeback cache (files are opened
            // FOPEN_NOFLUSH), after the kernel wrote the file's dirty pages.
            // Flush-behind: a close does not wait for the file's writes
            // still behind (whatever reads the file settles them first, and
            // fsync waits for them); it reports an error one of them has met
            // that this handle was not told of.
            Op::Flush { fh } => reply_empty(reply, self.fs.write_error(fh)),
            Op::Release { fh } => match self.fs.release_handle(ino, fh) {
                false => reply.ok(),
                true => self.spawn_meta(move |fs| async move { reply_empty(reply, fs.reclaim_unheld(ino).await) }),
            },
            Op::Fsync { fh, .. } => {
                self.fs.created(ino);
                self.spawn(move |fs| async move { reply_empty(reply, fs.fsync(ino, Some(fh)).await) })
            }
            Op::Fsyncdir => self.spawn(move |fs| async move { reply_empty(reply, fs.sync().await) }),
            Op::Opendir => reply.opened(0, 0),
            Op::Releasedir | Op::Destroy => reply.ok(),
            Op::Readdir { offset, size, plus } => self.readdir(ino, offset, size, plus, reply),
            Op::Statfs => {
                let (pages, free) = self.fs.space();
                let inodes = self.fs.meta().read(|s| s.usage().inodes);
                // Inodes are not a fixed table: report room for as many as pages.
                let s = proto::Statfs {
                    blocks: pages,
                    bfree: free,
                    bavail: free,
                    files: inodes + free,
                    ffree: free,
                    bsize: 4096,
                    namelen: 255,
                    frsize: 4096,
                };
                reply.statfs(&s)
            }
            Op::Setxattr { name, value, flags } => {
                self.fs.created(ino);
                let mode = match flags {
                    0 => XattrMode::Upsert,
                    libc::XATTR_CREATE => XattrMode::Create,
                    libc::XATTR_REPLACE => XattrMode::Replace,
                    _ => return reply.error(libc::EINVAL),
                };
                self.apply_empty(
                    Cmd::SetXattr { ino, name: name.to_vec(), value: value.to_vec(), mode, now: now() },
                    reply,
                )
            }
            Op::Getxattr { name, size } => {
                self.fs.created(ino);
                reply_xattr(reply, self.fs.meta().read(|s| s.getxattr(ino, name).map(<[u8]>::to_vec)), size)
            }
            Op::Listxattr { size } => {
                self.fs.created(ino);
                let names = self.fs.meta().read(|s| {
                    s.listxattr(ino).map(|names| {
                        names.fold(Vec::new(), |mut out, n| {
                            out.extend_from_slice(n);
                            out.push(0);
                            out
                        })
                    })
                });
                reply_xattr(reply, names, size)
            }
            Op::Removexattr { name } => {
                self.fs.created(ino);
                self.apply_empty(Cmd::RemoveXattr { ino, name: name.to_vec(), now: now() }, reply)
            }
            Op::Interrupt { .. } => {}
            Op::Init { .. } | Op::Access { .. } | Op::Other(_) => reply.error(libc::ENOSYS),
        }
    }
}

fn reply_data(reply: Reply, r: Result<Vec<u8>, Errno>) {
    match r {
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(e.0),
    }
}

impl Fuse {
    /// Applies `cmd`, which makes a node, on the metadata thread and
    /// replies with its entry.
    fn apply_entry(&self, cmd: Cmd, reply: Reply) {
        self.spawn_meta(move |fs| async move { reply_entry(&fs, reply, fs.apply(cmd).await, false) });
    }

    /// Applies `cmd` on the metadata thread and replies with its success.
    fn apply_empty(&self, cmd: Cmd, reply: Reply) {
        self.spawn_meta(move |fs| async move { reply_empty(reply, fs.apply(cmd).await) });
    }

    fn lookup(&self, parent: u64, name: &[u8], reply: Reply) {
        match self.fs.meta().read(|s| s.lookup(parent, name)) {
            Ok(a) if self.fs.writing(a.ino) => {
                self.fs.looked_up(a.ino);
                self.spawn(move |fs| async move {
                    reply_entry(&fs, reply, fs.settled_attr(a.ino).await.map(FsReply::Entry), true)
                });
            }
            Ok(a) => {
                self.fs.looked_up(a.ino);
                reply.entry(&a)
            }
            Err(e) => reply.error(e.0),
        }
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if self.fs.forget_lookups(ino, nlookup) {
            self.spawn_meta(move |fs| async move {
                if let Err(e) = fs.reclaim_unheld(ino).await {
                    tracing::error!("reclaiming inode {ino} after the kernel forgot it: {e}");
                }
            });
        }
    }

    fn getattr(&self, ino: u64, reply: Reply) {
        if self.fs.writing(ino) {
            return self.spawn(move |fs| async move {
                match fs.settled_attr(ino).await {
                    Ok(a) => reply.attr(&a),
                    Err(e) => reply.error(e.0),
                }
            });
        }
        match self.fs.meta().read(|s| s.getattr(ino)) {
            Ok(a) => reply.attr(&a),
            Err(e) => reply.error(e.0),
        }
    }

    fn setattr(&self, h: &Header, s: proto::SetattrIn, reply: Reply) {
        let ino = h.nodeid;
        self.fs.created(ino);
        let time = |now_bit, bit, t| match (s.valid & now_bit != 0, s.valid & bit != 0) {
            (true, _) => Some(now()),
            (false, true) => Some(t),
            (false, false) => None,
        };
        let set = SetAttr {
            perm: s.get(fattr::MODE, s.mode & 0o7777),
            uid: s.get(fattr::UID, s.uid),
            gid: s.get(fattr::GID, s.gid),
            size: s.get(fattr::SIZE, s.size),
            atime: time(fattr::ATIME_NOW, fattr::ATIME, s.atime),
            mtime: time(fattr::MTIME_NOW, fattr::MTIME, s.mtime),
            btime: None,
            tail: None,
        };
        // What the change takes away (we handle KILLPRIV_V2): a change of
        // owner takes the set-ID bits whoever makes it; a truncate takes
        // them when the kernel says the caller lacks CAP_FSETID, and the
        // capabilities always.
        let drop = match (set.uid.is_some() || set.gid.is_some(), set.size.is_some()) {
            (true, _) => Some(DropPrivs::All),
            (false, true) if s.valid & fattr::KILL_SUIDGID != 0 => Some(DropPrivs::All),
            (false, true) => Some(DropPrivs::Caps),
            (false, false) => None,
        };
        self.spawn_meta(move |fs| async move {
            match fs.setattr(ino, set, drop, now()).await {
                Ok(a) => reply.attr(&a),
                Err(e) => reply.error(e.0),
            }
        });
    }

    /// Answered at once when the unlink cannot fail: it applies behind,
    /// and reads see it gone meanwhile ([`FileSystem::unlink_ahead`]).
    fn unlink(&self, parent: u64, name: &[u8], reply: Reply) {
        let now = now();
        if self.fs.unlink_ahead(parent, name, now) {
            return reply.ok();
        }
        self.apply_empty(Cmd::Unlink { parent, name: name.to_vec(), now }, reply)
    }

    fn link(&self, ino: u64, parent: u64, name: &[u8], reply: Reply) {
        self.fs.created(ino);
        let cmd = Cmd::Link { ino, parent, name: name.to_vec(), now: now() };
        self.spawn_meta(move |fs| async move {
            // The reply holds the file's attributes.
            fs.settle(ino).await;
            reply_entry(&fs, reply, fs.apply(cmd).await, false)
        });
    }

    /// No FUSE_ATOMIC_O_TRUNC: with it the kernel sends OPEN, and we would
    /// truncate, before it checks for ETXTBSY, so a refused
    /// `open(O_RDONLY|O_TRUNC)` of a running binary still emptied it. The
    /// kernel truncates with a SETATTR after its checks instead.
    fn open(&self, ino: u64, reply: Reply) {
        match self.fs.meta().read(|s| s.getattr(ino).map(|_| ())) {
            Ok(()) => reply.opened(self.fs.opened(ino), OPEN_FLAGS),
            Err(e) => reply.error(e.0),
        }
    }

    fn create(&self, h: &Header, name: &[u8], perm: u32, reply: Reply) {
        let (parent, by) = (h.nodeid, creator(h));
        let created = |fs: &FileSystem, a: Attr, reply: Reply| {
            fs.looked_up(a.ino);
            let fh = fs.opened(a.ino);
            reply.created(&a, fh, OPEN_FLAGS);
        };
        // Answered here if it cannot fail; it applies behind.
        if let Some(a) = self.fs.create_ahead(parent, name, perm, by) {
            return created(&self.fs, a, reply);
        }
        let cmd = Cmd::Mknod { parent, name: name.to_vec(), kind: FileKind::File, perm, rdev: 0, by };
        self.spawn_meta(move |fs| async move {
            match fs.apply(cmd).await {
                Ok(FsReply::Entry(a)) => created(&fs, a, reply),
                Ok(_) => reply.error(libc::EIO),
                Err(e) => reply.error(e.0),
            }
        });
    }

    fn read(&self, ino: u64, offset: u64, size: u32, reply: Reply) {
        self.fs.created(ino);
        // Answered by the reactor that reads the pages, unless the file has
        // writes behind to wait for (or is reduced): then from a task.
        let answer = move |r: Result<&[u8], Errno>| match r {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(e.0),
        };
        let Err(answer) = self.fs.try_read_now(ino, offset, size as usize, answer) else { return };
        self.spawn(
            move |fs| async move { answer(fs.read(ino, offset, size as usize).await.as_deref().map_err(|&e| e)) },
        );
    }

    fn write(&self, ino: u64, offset: u64, data: &[u8], write_flags: u32, flags: u32, reply: Reply) {
        self.fs.created(ino);
        // A write takes the file's capabilities, and its set-ID bits if the
        // kernel says the writer lacks CAP_FSETID; a file with any of them
        // drops them first, from a task.
        let drop = match write_flags & proto::WRITE_KILL_SUIDGID != 0 {
            true => DropPrivs::All,
            false => DropPrivs::Caps,
        };
        let dropping = self.fs.would_drop(ino, drop).unwrap_or(false);
        // Buffered writes go behind their replies, staged from this thread
        // where they need not wait. O_DIRECT ones are staged here too and
        // answered from the reactor once the device has them, their pages
        // mapped behind. O_[D]SYNC ones are answered when done.
        let len = data.len() as u32;
        let answer = move |r: Result<(), Errno>| match r {
            Ok(()) => reply.written(len),
            Err(e) => reply.error(e.0),
        };
        let flags = flags as i32;
        let (direct, sync) = (flags & libc::O_DIRECT != 0, flags & libc::O_DSYNC != 0);
        let answer = match sync || dropping {
            true => answer,
            false => match self.fs.try_write_now(ino, offset, data, now(), direct, answer) {
                Ok(()) => return,
                Err(answer) => answer,
            },
        };
        let behind = !direct && !sync;
        let data = data.to_vec();
        self.spawn(move |fs| async move {
            if dropping && let Err(e) = fs.drop_privs(ino, drop, now()).await {
                return answer(Err(e));
            }
            answer(match behind {
                true => fs.write_behind(ino, offset, &data, now()).await,
                false => fs.write(ino, offset, &data, now()).await.map(|_| ()),
            })
        });
    }

    fn fallocate(&self, h: &Header, offset: u64, length: u64, mode: i32, reply: Reply) {
        let ino = h.nodeid;
        self.fs.created(ino);
        // Like a write, it takes privileges (`drops_of` says whose).
        let drop = drops_of(h);
        self.spawn(move |fs| async move {
            if let Err(e) = fs.drop_privs(ino, drop, now()).await {
                return reply.error(e.0);
            }
            reply_empty(reply, fs.fallocate(ino, offset, length, mode, now()).await)
        });
    }

    fn readdir(&self, ino: u64, offset: u64, size: u32, plus: bool, reply: Reply) {
        match self.fs.meta().read(|s| s.readdir(ino, offset, 1024)) {
            // The entries' attributes must be what their writers were told.
            Ok(entries) if plus && entries.iter().any(|e| self.fs.writing(e.ino)) => self.spawn(move |fs| async move {
                for e in &entries {
                    fs.settle(e.ino).await;
                }
                reply_dir(&fs, reply, entries, size, plus)
            }),
            Ok(entries) => reply_dir(&self.fs, reply, entries, size, plus),
            Err(e) => reply.error(e.0),
        }
    }
}
