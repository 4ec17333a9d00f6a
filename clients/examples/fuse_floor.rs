//! The FUSE floor: a file system held in memory that answers every request
//! on the thread that read it, mounted exactly as ClaudeFS mounts
//! ([`clients::fuse::mount_config`], the same init flags but readdirplus,
//! the same cache lifetimes). Nothing a file system can do costs less per
//! request, so `hack/bench/fs.py` measures it beside ClaudeFS: what the
//! kernel, `/dev/fuse` and fuser's threads take alone on the host.
//!
//!   cargo run --release -p claudefs-clients --example fuse_floor -- MOUNTPOINT
//!
//! Runs until the mount point is unmounted (`umount MOUNTPOINT`). Regular
//! files and directories only; no hard links, symlinks, device nodes or
//! xattrs (they answer ENOSYS, or ENODATA for a read of an xattr, as
//! ClaudeFS answers for one that is absent).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::Mutex;
use std::time::SystemTime;

use clients::fuse::{OPEN_FLAGS, TTL};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, KernelConfig, OpenFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

struct Node {
    attr: FileAttr,
    /// A directory's entries.
    entries: BTreeMap<OsString, u64>,
    /// A file's bytes.
    data: Vec<u8>,
}

struct Floor {
    nodes: HashMap<u64, Node>,
    next: u64,
}

impl Floor {
    fn new() -> Floor {
        let root = Node { attr: attr(1, FileType::Directory, 0o755, 0, 0), entries: BTreeMap::new(), data: Vec::new() };
        Floor { nodes: HashMap::from([(1, root)]), next: 2 }
    }

    fn dir(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        match self.nodes.get_mut(&ino.0) {
            Some(n) if n.attr.kind == FileType::Directory => Ok(n),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn node(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)
    }

    /// Makes `name` in `parent`: its attributes.
    fn make(
        &mut self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: FileType,
        perm: u32,
    ) -> Result<FileAttr, Errno> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let ino = self.next;
        let dir = self.dir(parent)?;
        if dir.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        dir.entries.insert(name.to_owned(), ino);
        let now = SystemTime::now();
        (dir.attr.mtime, dir.attr.ctime) = (now, now);
        if kind == FileType::Directory {
            dir.attr.nlink += 1;
        }
        self.next += 1;
        let a = attr(ino, kind, perm, req.uid(), req.gid());
        self.nodes.insert(ino, Node { attr: a, entries: BTreeMap::new(), data: Vec::new() });
        Ok(a)
    }

    /// Removes `name` from `parent`, a directory if `dir` (which must be empty).
    fn remove(&mut self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        let node = &self.nodes[&ino];
        match (dir, node.attr.kind == FileType::Directory) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !node.entries.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.nodes.remove(&ino);
        let p = self.dir(parent)?;
        p.entries.remove(name);
        let now = SystemTime::now();
        (p.attr.mtime, p.attr.ctime) = (now, now);
        if dir {
            p.attr.nlink -= 1;
        }
        Ok(())
    }
}

fn attr(ino: u64, kind: FileType, perm: u32, uid: u32, gid: u32) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm: perm as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

struct FloorFs(Mutex<Floor>);

impl FloorFs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Floor> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Filesystem for FloorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(clients::fuse::MAX_WRITE);
        let _ = config.set_max_readahead(clients::fuse::MAX_WRITE);
        for flag in [
            fuser::InitFlags::FUSE_PARALLEL_DIROPS,
            fuser::InitFlags::FUSE_POSIX_ACL,
            fuser::InitFlags::FUSE_ASYNC_DIO,
            fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ] {
            let _ = config.add_capabilities(flag);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut f = self.lock();
        let found = f.dir(parent).and_then(|d| d.entries.get(name).copied().ok_or(Errno::ENOENT));
        match found {
            Ok(ino) => reply.entry(&TTL, &f.nodes[&ino].attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().node(ino) {
            Ok(n) => reply.attr(&TTL, &n.attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut f = self.lock();
        let n = match f.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if let Some(m) = mode {
            n.attr.perm = (m & 0o7777) as u16;
        }
        n.attr.uid = uid.unwrap_or(n.attr.uid);
        n.attr.gid = gid.unwrap_or(n.attr.gid);
        if let Some(s) = size {
            n.data.resize(s as usize, 0);
            n.attr.size = s;
            n.attr.mtime = SystemTime::now();
        }
        n.attr.atime = atime.map_or(n.attr.atime, time);
        n.attr.mtime = mtime.map_or(n.attr.mtime, time);
        n.attr.ctime = SystemTime::now();
        reply.attr(&TTL, &n.attr)
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.lock().make(req, parent, name, FileType::Directory, mode & !umask & 0o7777) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.lock().remove(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.lock().remove(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.lock().node(ino) {
            Ok(_) => reply.opened(FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(e),
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
        match self.lock().make(req, parent, name, FileType::RegularFile, mode & !umask & 0o7777) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
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
        let mut f = self.lock();
        match f.node(ino) {
            Ok(n) => {
                let start = (offset as usize).min(n.data.len());
                let end = (start + size as usize).min(n.data.len());
                reply.data(&n.data[start..end])
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut f = self.lock();
        let n = match f.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let end = offset as usize + data.len();
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[offset as usize..end].copy_from_slice(data);
        n.attr.size = n.data.len() as u64;
        n.attr.blocks = n.attr.size.div_ceil(512);
        n.attr.mtime = SystemTime::now();
        n.attr.ctime = n.attr.mtime;
        reply.written(data.len() as u32)
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut f = self.lock();
        let entries: Vec<(OsString, u64)> = match f.dir(ino) {
            Ok(d) => d.entries.iter().map(|(name, &ino)| (name.clone(), ino)).collect(),
            Err(e) => return reply.error(e),
        };
        // Offsets are positions in the (sorted) listing, "." and ".." first.
        let dots = [(OsString::from("."), ino.0), (OsString::from(".."), ino.0)];
        for (i, (name, child)) in dots.into_iter().chain(entries).enumerate().skip(offset as usize) {
            let kind = f.nodes.get(&child).map_or(FileType::RegularFile, |n| n.attr.kind);
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.lock().nodes.len() as u64;
        reply.statfs(1 << 24, 1 << 23, 1 << 23, files + (1 << 20), 1 << 20, 4096, 255, 4096)
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENODATA)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 { reply.size(0) } else { reply.data(&[]) }
    }
}

fn main() {
    let Some(mountpoint) = std::env::args_os().nth(1) else {
        eprintln!("usage: fuse_floor MOUNTPOINT (runs until it is unmounted)");
        std::process::exit(2);
    };
    let fs = FloorFs(Mutex::new(Floor::new()));
    if let Err(e) = fuser::mount(fs, &mountpoint, &clients::fuse::mount_config()) {
        eprintln!("fuse_floor: {}: {e}", mountpoint.to_string_lossy());
        std::process::exit(1);
    }
}
