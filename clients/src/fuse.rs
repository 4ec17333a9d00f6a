//! The FUSE gateway: the kernel's requests answered from a [`FileSystem`].
//!
//! fuser's worker threads decode requests and answer on the spot what needs
//! no waiting: metadata reads from the replicated state, closes, and
//! buffered writes that can be staged at once. Reads, and O_DIRECT writes
//! that can be staged at once, are answered by the reactor that does their
//! I/O. Metadata changes, and the maps of writes behind, run as tasks on
//! the metadata group's thread, the rest of the data path as tasks on a
//! tokio runtime; each replies when done, so a slow request never holds a
//! worker, and every hand-off to another thread is a wake-up that costs
//! more than most commands (docs/PERFORMANCE.md). Permissions are the
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

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blobfs::fs::{
    Attr, Cmd, Creator, DropPrivs, Errno, FileKind, FileSystem, RenameMode, Reply, SetAttr, Time, XattrMode,
};
use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

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
///   ([`Fuse::flush`]).
pub const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES.union(FopenFlags::FOPEN_NOFLUSH);

/// How ClaudeFS mounts: permission checks by the kernel, open to every user
/// (the server runs as root), several request threads.
pub fn mount_config() -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("claudefs".into()),
        fuser::MountOption::Subtype("claudefs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(4);
    config
}

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

fn errno(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

/// What a truncate or fallocate by `req`'s caller takes away: the
/// set-ID bits too unless it has CAP_FSETID, which the kernel would say in
/// a flag fuser 0.18 does not pass on; root is taken to have it.
fn drops_of(req: &Request) -> DropPrivs {
    if req.uid() == 0 { DropPrivs::Caps } else { DropPrivs::All }
}

fn now() -> Time {
    Time::now()
}

fn time_of(t: SystemTime) -> Time {
    Time::from(t)
}

fn system_time(t: Time) -> SystemTime {
    let (secs, nanos) = t.split();
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(u64::from(nanos))
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.btime),
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn creator(req: &Request) -> Creator {
    Creator { uid: req.uid(), gid: req.gid(), now: now() }
}

fn name_of(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// Replies with an entry, counting the kernel's lookup of it first (it may
/// forget it as soon as it has the reply) unless `counted` already.
fn reply_entry(fs: &FileSystem, reply: ReplyEntry, r: Result<Reply, Errno>, counted: bool) {
    match r {
        Ok(Reply::Entry(a)) => {
            if !counted {
                fs.looked_up(a.ino);
            }
            reply.entry(&TTL, &file_attr(&a), Generation(a.generation))
        }
        Ok(other) => {
            tracing::error!("fuse: an entry was expected, the file system replied {other:?}");
            reply.error(fuser::Errno::EIO)
        }
        Err(e) => reply.error(errno(e)),
    }
}

/// Replies to readdirplus with `entries` and their attributes (entries
/// gone since are left out).
fn reply_plus(fs: &FileSystem, mut reply: ReplyDirectoryPlus, entries: Vec<blobfs::fs::DirEntry>) {
    let attrs: Vec<Option<Attr>> = fs.meta().read(|s| entries.iter().map(|e| s.getattr(e.ino).ok()).collect());
    for (e, a) in entries.iter().zip(attrs) {
        let Some(a) = a else { continue };
        let name = OsStr::from_bytes(&e.name);
        if reply.add(INodeNo(e.ino), e.cookie, name, &TTL, &file_attr(&a), Generation(a.generation)) {
            break;
        }
        // The kernel takes a lookup of every entry but `.` and `..`.
        if e.name != b"." && e.name != b".." {
            fs.looked_up(e.ino);
        }
    }
    reply.ok();
}

fn reply_empty(reply: ReplyEmpty, r: Result<impl Sized, Errno>) {
    match r {
        Ok(_) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<Time> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => time_of(t),
        TimeOrNow::Now => now(),
    })
}

/// A regular file may be created ahead of its apply
/// ([`FileSystem::create_ahead`]): lookups, attributes, listings, opens and
/// closes see it at once; every handler that asks more of an inode, or
/// changes it, first waits until the state has it ([`FileSystem::created`],
/// microseconds, and nothing when the inode is not one of those).
impl Filesystem for Fuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        // Each is optional: an older kernel without one still mounts.
        for flag in [
            fuser::InitFlags::FUSE_DO_READDIRPLUS,
            fuser::InitFlags::FUSE_PARALLEL_DIROPS,
            fuser::InitFlags::FUSE_POSIX_ACL,
            // Asynchronous direct I/O reaches us as concurrent requests.
            fuser::InitFlags::FUSE_ASYNC_DIO,
            // We drop set-ID bits and capabilities on writes, truncates and
            // changes of owner (`DropPrivs`), so the kernel need not ask
            // for `security.capability` before every write: without this
            // a GETXATTR round trip, under the inode's lock, went ahead of
            // each write (4 KiB random writes: 37 k -> 50 k IOPS).
            fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            let _ = config.add_capabilities(flag);
        }
        if self.writeback_cache && config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE).is_err() {
            tracing::warn!("the kernel offers no writeback cache: writes go through");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.meta().read(|s| s.lookup(parent.0, name.as_bytes())) {
            Ok(a) if self.fs.writing(a.ino) => {
                self.fs.looked_up(a.ino);
                self.spawn(move |fs| async move {
                    reply_entry(&fs, reply, fs.settled_attr(a.ino).await.map(Reply::Entry), true)
                });
            }
            Ok(a) => {
                self.fs.looked_up(a.ino);
                reply.entry(&TTL, &file_attr(&a), Generation(a.generation))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if self.fs.forget_lookups(ino.0, nlookup) {
            self.spawn_meta(move |fs| async move {
                if let Err(e) = fs.reclaim_unheld(ino.0).await {
                    tracing::error!("reclaiming inode {} after the kernel forgot it: {e}", ino.0);
                }
            });
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if self.fs.writing(ino.0) {
            return self.spawn(move |fs| async move {
                match fs.settled_attr(ino.0).await {
                    Ok(a) => reply.attr(&TTL, &file_attr(&a)),
                    Err(e) => reply.error(errno(e)),
                }
            });
        }
        match self.fs.meta().read(|s| s.getattr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.fs.created(ino.0);
        let set = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            btime: crtime.map(time_of),
            tail: None,
        };
        // What the change takes away (we handle KILLPRIV_V2): a change of
        // owner takes the set-ID bits whoever makes it; a truncate, as
        // `drops_of` says.
        let drop = match (uid.is_some() || gid.is_some(), size.is_some()) {
            (true, _) => Some(DropPrivs::All),
            (false, true) => Some(drops_of(req)),
            (false, false) => None,
        };
        self.spawn_meta(move |fs| async move {
            match fs.setattr(ino.0, set, drop, now()).await {
                Ok(a) => reply.attr(&TTL, &file_attr(&a)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.fs.created(ino.0);
        match self.fs.meta().read(|s| s.readlink(ino.0).map(<[u8]>::to_vec)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let Some(kind) = FileKind::from_mode(mode).filter(|k| !matches!(k, FileKind::Dir | FileKind::Symlink)) else {
            return reply.error(fuser::Errno::EINVAL);
        };
        let cmd = Cmd::Mknod {
            parent: parent.0,
            name: name_of(name),
            kind,
            perm: mode & !umask & 0o7777,
            rdev,
            by: creator(req),
        };
        self.spawn_meta(move |fs| async move { reply_entry(&fs, reply, fs.apply(cmd).await, false) });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let cmd = Cmd::Mkdir { parent: parent.0, name: name_of(name), perm: mode & !umask & 0o7777, by: creator(req) };
        self.spawn_meta(move |fs| async move { reply_entry(&fs, reply, fs.apply(cmd).await, false) });
    }

    /// Answered at once when the unlink cannot fail: it applies behind,
    /// and reads see it gone meanwhile ([`FileSystem::unlink_ahead`]).
    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let now = now();
        if self.fs.unlink_ahead(parent.0, name.as_bytes(), now) {
            return reply.ok();
        }
        let cmd = Cmd::Unlink { parent: parent.0, name: name_of(name), now };
        self.spawn_meta(move |fs| async move { reply_empty(reply, fs.apply(cmd).await) });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let cmd = Cmd::Rmdir { parent: parent.0, name: name_of(name), now: now() };
        self.spawn_meta(move |fs| async move { reply_empty(reply, fs.apply(cmd).await) });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &std::path::Path, reply: ReplyEntry) {
        let cmd = Cmd::Symlink {
            parent: parent.0,
            name: name_of(link_name),
            target: target.as_os_str().as_bytes().to_vec(),
            by: creator(req),
        };
        self.spawn_meta(move |fs| async move { reply_entry(&fs, reply, fs.apply(cmd).await, false) });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            return reply.error(fuser::Errno::EINVAL);
        };
        let cmd = Cmd::Rename {
            parent: parent.0,
            name: name_of(name),
            new_parent: newparent.0,
            new_name: name_of(newname),
            mode,
            now: now(),
        };
        self.spawn_meta(move |fs| async move { reply_empty(reply, fs.apply(cmd).await) });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.fs.created(ino.0);
        let cmd = Cmd::Link { ino: ino.0, parent: newparent.0, name: name_of(newname), now: now() };
        self.spawn_meta(move |fs| async move {
            // The reply holds the file's attributes.
            fs.settle(ino.0).await;
            reply_entry(&fs, reply, fs.apply(cmd).await, false)
        });
    }

    /// No FUSE_ATOMIC_O_TRUNC: with it the kernel sends OPEN, and we would
    /// truncate, before it checks for ETXTBSY, so a refused
    /// `open(O_RDONLY|O_TRUNC)` of a running binary still emptied it. The
    /// kernel truncates with a SETATTR after its checks instead.
    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.meta().read(|s| s.getattr(ino.0).map(|_| ())) {
            Ok(()) => reply.opened(FileHandle(self.fs.opened(ino.0)), OPEN_FLAGS),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let (perm, by) = (mode & !umask & 0o7777, creator(req));
        let created = |fs: &FileSystem, a: Attr, reply: ReplyCreate| {
            fs.looked_up(a.ino);
            let fh = FileHandle(fs.opened(a.ino));
            reply.created(&TTL, &file_attr(&a), Generation(a.generation), fh, OPEN_FLAGS);
        };
        // Answered here if it cannot fail; it applies behind.
        if let Some(a) = self.fs.create_ahead(parent.0, name.as_bytes(), perm, by) {
            return created(&self.fs, a, reply);
        }
        let cmd = Cmd::Mknod { parent: parent.0, name: name_of(name), kind: FileKind::File, perm, rdev: 0, by };
        self.spawn_meta(move |fs| async move {
            match fs.apply(cmd).await {
                Ok(Reply::Entry(a)) => created(&fs, a, reply),
                Ok(_) => reply.error(fuser::Errno::EIO),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.fs.created(ino.0);
        // Answered by the reactor that reads the pages, unless the file has
        // writes behind to wait for (or is reduced): then from a task.
        let answer = move |r: Result<&[u8], Errno>| match r {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(errno(e)),
        };
        let Err(answer) = self.fs.try_read_now(ino.0, offset, size as usize, answer) else { return };
        self.spawn(
            move |fs| async move { answer(fs.read(ino.0, offset, size as usize).await.as_deref().map_err(|&e| e)) },
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        self.fs.created(ino.0);
        // A write takes the file's capabilities, and its set-ID bits if the
        // kernel says the writer lacks CAP_FSETID; a file with any of them
        // drops them first, from a task.
        let drop = match write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            true => DropPrivs::All,
            false => DropPrivs::Caps,
        };
        let dropping = self.fs.would_drop(ino.0, drop).unwrap_or(false);
        // Buffered writes go behind their replies, staged from this thread
        // where they need not wait. O_DIRECT ones are staged here too and
        // answered from the reactor once the device has them, their pages
        // mapped behind. O_[D]SYNC ones are answered when done.
        let len = data.len() as u32;
        let answer = move |r: Result<(), Errno>| match r {
            Ok(()) => reply.written(len),
            Err(e) => reply.error(errno(e)),
        };
        let (direct, sync) = (flags.0 & libc::O_DIRECT != 0, flags.0 & libc::O_DSYNC != 0);
        let answer = match sync || dropping {
            true => answer,
            false => match self.fs.try_write_now(ino.0, offset, data, now(), direct, answer) {
                Ok(()) => return,
                Err(answer) => answer,
            },
        };
        let behind = !direct && !sync;
        let data = data.to_vec();
        self.spawn(move |fs| async move {
            if dropping && let Err(e) = fs.drop_privs(ino.0, drop, now()).await {
                return answer(Err(e));
            }
            answer(match behind {
                true => fs.write_behind(ino.0, offset, &data, now()).await,
                false => fs.write(ino.0, offset, &data, now()).await.map(|_| ()),
            })
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.fs.created(ino.0);
        // Like a write, it takes privileges (`setattr` says whose).
        let drop = drops_of(req);
        self.spawn(move |fs| async move {
            if let Err(e) = fs.drop_privs(ino.0, drop, now()).await {
                return reply.error(errno(e));
            }
            reply_empty(reply, fs.fallocate(ino.0, offset, length, mode, now()).await)
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        // Sent only with the writeback cache (files are opened
        // FOPEN_NOFLUSH), after the kernel wrote the file's dirty pages.
        // Flush-behind: a close does not wait for the file's writes still
        // behind (whatever reads the file settles them first, and fsync
        // waits for them); it reports an error one of them has met that
        // this handle was not told of.
        reply_empty(reply, self.fs.write_error(fh.0))
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.release_handle(ino.0, fh.0) {
            false => reply.ok(),
            true => self.spawn_meta(move |fs| async move { reply_empty(reply, fs.reclaim_unheld(ino.0).await) }),
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.fs.created(ino.0);
        self.spawn(move |fs| async move { reply_empty(reply, fs.fsync(ino.0, Some(fh.0)).await) });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.spawn(move |fs| async move { reply_empty(reply, fs.sync().await) });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.fs.meta().read(|s| s.readdir(ino.0, offset, 1024)) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(INodeNo(e.ino), e.cookie, file_type(e.kind), OsStr::from_bytes(&e.name)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        let listed = self.fs.meta().read(|s| s.readdir(ino.0, offset, 1024));
        match listed {
            // The entries' attributes must be what their writers were told.
            Ok(entries) if entries.iter().any(|e| self.fs.writing(e.ino)) => self.spawn(move |fs| async move {
                for e in &entries {
                    fs.settle(e.ino).await;
                }
                reply_plus(&fs, reply, entries)
            }),
            Ok(entries) => reply_plus(&self.fs, reply, entries),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (pages, free) = self.fs.space();
        let inodes = self.fs.meta().read(|s| s.usage().inodes);
        // Inodes are not a fixed table: report room for as many as pages.
        reply.statfs(pages, free, free, inodes + free, free, 4096, 255, 4096);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.fs.created(ino.0);
        let mode = match flags {
            0 => XattrMode::Upsert,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return reply.error(fuser::Errno::EINVAL),
        };
        let cmd = Cmd::SetXattr { ino: ino.0, name: name_of(name), value: value.to_vec(), mode, now: now() };
        self.spawn_meta(move |fs| async move { reply_empty(reply, fs.apply(cmd).await) });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.fs.created(ino.0);
        match self.fs.meta().read(|s| s.getxattr(ino.0, name.as_bytes()).map(<[u8]>::to_vec)) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.fs.created(ino.0);
        let names = self.fs.meta().read(|s| {
            s.listxattr(ino.0).map(|names| {
                names.fold(Vec::new(), |mut out, n| {
                    out.extend_from_slice(n);
                    out.push(0);
                    out
                })
            })
        });
        match names {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.fs.created(ino.0);
        let cmd = Cmd::RemoveXattr { ino: ino.0, name: name_of(name), now: now() };
        self.spawn_meta(move |fs| async move { reply_empty(reply, fs.apply(cmd).await) });
    }
}
