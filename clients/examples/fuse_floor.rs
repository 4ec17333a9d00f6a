//! The FUSE floor: a file system held in memory that answers every request
//! on the thread that read it, mounted exactly as ClaudeFS mounts
//! ([`clients::fuse::Session`] with the default [`clients::fuse::MountOptions`]:
//! over io_uring where the kernel offers it, the same init flags but
//! readdirplus, the same cache lifetimes). Nothing a file system can do costs less per
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
use std::sync::{Arc, Mutex};

use blobfs::fs::{Attr, FileKind, Time};
use clients::fuse::proto::{Header, Op, Statfs, fattr, init};
use clients::fuse::{Handler, MountOptions, OPEN_FLAGS, Reply, Session};

struct Node {
    attr: Attr,
    /// A directory's entries.
    entries: BTreeMap<Vec<u8>, u64>,
    /// A file's bytes.
    data: Vec<u8>,
}

struct Floor {
    nodes: HashMap<u64, Node>,
    next: u64,
}

impl Floor {
    fn new() -> Floor {
        let root = Node { attr: attr(1, FileKind::Dir, 0o755, 0, 0), entries: BTreeMap::new(), data: Vec::new() };
        Floor { nodes: HashMap::from([(1, root)]), next: 2 }
    }

    fn dir(&mut self, ino: u64) -> Result<&mut Node, i32> {
        match self.nodes.get_mut(&ino) {
            Some(n) if n.attr.kind == FileKind::Dir => Ok(n),
            Some(_) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn node(&mut self, ino: u64) -> Result<&mut Node, i32> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    /// Makes `name` in `parent`: its attributes.
    fn make(&mut self, h: &Header, name: &[u8], kind: FileKind, perm: u32) -> Result<Attr, i32> {
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let ino = self.next;
        let dir = self.dir(h.nodeid)?;
        if dir.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        dir.entries.insert(name.to_owned(), ino);
        (dir.attr.mtime, dir.attr.ctime) = (Time::now(), Time::now());
        if kind == FileKind::Dir {
            dir.attr.nlink += 1;
        }
        self.next += 1;
        let a = attr(ino, kind, perm, h.uid, h.gid);
        self.nodes.insert(ino, Node { attr: a.clone(), entries: BTreeMap::new(), data: Vec::new() });
        Ok(a)
    }

    /// Removes `name` from `parent`, a directory if `dir` (which must be empty).
    fn remove(&mut self, parent: u64, name: &[u8], dir: bool) -> Result<(), i32> {
        let ino = *self.dir(parent)?.entries.get(name).ok_or(libc::ENOENT)?;
        let node = &self.nodes[&ino];
        match (dir, node.attr.kind == FileKind::Dir) {
            (true, false) => return Err(libc::ENOTDIR),
            (false, true) => return Err(libc::EISDIR),
            (true, true) if !node.entries.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        self.nodes.remove(&ino);
        let p = self.dir(parent)?;
        p.entries.remove(name);
        (p.attr.mtime, p.attr.ctime) = (Time::now(), Time::now());
        if dir {
            p.attr.nlink -= 1;
        }
        Ok(())
    }

    fn setattr(&mut self, ino: u64, s: &clients::fuse::proto::SetattrIn) -> Result<Attr, i32> {
        let n = self.node(ino)?;
        if let Some(m) = s.get(fattr::MODE, s.mode) {
            n.attr.perm = m & 0o7777;
        }
        n.attr.uid = s.get(fattr::UID, s.uid).unwrap_or(n.attr.uid);
        n.attr.gid = s.get(fattr::GID, s.gid).unwrap_or(n.attr.gid);
        if let Some(size) = s.get(fattr::SIZE, s.size) {
            n.data.resize(size as usize, 0);
            n.attr.size = size;
            n.attr.mtime = Time::now();
        }
        let time = |now_bit, bit, t, old| match (s.valid & now_bit != 0, s.valid & bit != 0) {
            (true, _) => Time::now(),
            (false, true) => t,
            (false, false) => old,
        };
        n.attr.atime = time(fattr::ATIME_NOW, fattr::ATIME, s.atime, n.attr.atime);
        n.attr.mtime = time(fattr::MTIME_NOW, fattr::MTIME, s.mtime, n.attr.mtime);
        n.attr.ctime = Time::now();
        Ok(n.attr.clone())
    }

    fn read(&mut self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let n = self.node(ino)?;
        let start = (offset as usize).min(n.data.len());
        let end = (start + size as usize).min(n.data.len());
        Ok(n.data[start..end].to_vec())
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let n = self.node(ino)?;
        let end = offset as usize + data.len();
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[offset as usize..end].copy_from_slice(data);
        n.attr.size = n.data.len() as u64;
        n.attr.mtime = Time::now();
        n.attr.ctime = n.attr.mtime;
        Ok(data.len() as u32)
    }

    /// A listing from `offset`, as many entries as fit in `size` bytes.
    fn readdir(&mut self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let entries: Vec<(Vec<u8>, u64)> = self.dir(ino)?.entries.iter().map(|(n, &i)| (n.clone(), i)).collect();
        // Offsets are positions in the (sorted) listing, "." and ".." first.
        let dots = [(b".".to_vec(), ino), (b"..".to_vec(), ino)];
        let mut out = Vec::new();
        for (i, (name, child)) in dots.into_iter().chain(entries).enumerate().skip(offset as usize) {
            let kind = self.nodes.get(&child).map_or(FileKind::File, |n| n.attr.kind);
            if !clients::fuse::proto::put_dirent(&mut out, size as usize, child, i as u64 + 1, kind, &name, None) {
                break;
            }
        }
        Ok(out)
    }
}

fn attr(ino: u64, kind: FileKind, perm: u32, uid: u32, gid: u32) -> Attr {
    let t = Time::now();
    let nlink = if kind == FileKind::Dir { 2 } else { 1 };
    Attr { ino, kind, perm, uid, gid, size: 0, nlink, atime: t, mtime: t, ctime: t, btime: t, rdev: 0, generation: 0 }
}

struct FloorFs(Mutex<Floor>);

fn answer<T>(reply: Reply, r: Result<T, i32>, ok: impl FnOnce(Reply, T)) {
    match r {
        Ok(v) => ok(reply, v),
        Err(e) => reply.error(e),
    }
}

impl Handler for FloorFs {
    fn flags(&self) -> u64 {
        init::PARALLEL_DIROPS | init::POSIX_ACL | init::ASYNC_DIO | init::HANDLE_KILLPRIV_V2
    }

    fn dispatch(&self, h: &Header, op: Op<'_>, reply: Reply) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ino = h.nodeid;
        let entry = |reply: Reply, a: Attr| reply.entry(&a);
        match op {
            Op::Lookup { name } => {
                let found = f.dir(ino).and_then(|d| d.entries.get(name).copied().ok_or(libc::ENOENT));
                answer(reply, found.map(|i| f.nodes[&i].attr.clone()), entry)
            }
            Op::Getattr => answer(reply, f.node(ino).map(|n| n.attr.clone()), |r, a| r.attr(&a)),
            Op::Setattr(s) => answer(reply, f.setattr(ino, &s), |r, a| r.attr(&a)),
            Op::Mkdir { name, mode, umask } => {
                answer(reply, f.make(h, name, FileKind::Dir, mode & !umask & 0o7777), entry)
            }
            Op::Unlink { name } => answer(reply, f.remove(ino, name, false), |r, ()| r.ok()),
            Op::Rmdir { name } => answer(reply, f.remove(ino, name, true), |r, ()| r.ok()),
            Op::Open { .. } => answer(reply, f.node(ino).map(|_| ()), |r, ()| r.opened(0, OPEN_FLAGS)),
            Op::Create { name, mode, umask, .. } => {
                answer(reply, f.make(h, name, FileKind::File, mode & !umask & 0o7777), |r, a| {
                    r.created(&a, 0, OPEN_FLAGS)
                })
            }
            Op::Read { offset, size, .. } => answer(reply, f.read(ino, offset, size), |r, d| r.data(&d)),
            Op::Write { offset, data, .. } => answer(reply, f.write(ino, offset, data), |r, n| r.written(n)),
            Op::Readdir { offset, size, plus: false } => answer(reply, f.readdir(ino, offset, size), |r, d| r.data(&d)),
            Op::Statfs => {
                let files = f.nodes.len() as u64;
                let s = Statfs {
                    blocks: 1 << 24,
                    bfree: 1 << 23,
                    bavail: 1 << 23,
                    files: files + (1 << 20),
                    ffree: 1 << 20,
                    bsize: 4096,
                    namelen: 255,
                    frsize: 4096,
                };
                reply.statfs(&s)
            }
            Op::Getxattr { .. } => reply.error(libc::ENODATA),
            Op::Listxattr { size: 0 } => reply.xattr_size(0),
            Op::Listxattr { .. } => reply.data(&[]),
            Op::Opendir => reply.opened(0, 0),
            Op::Flush { .. } | Op::Release { .. } | Op::Releasedir | Op::Fsync { .. } | Op::Fsyncdir | Op::Destroy => {
                reply.ok()
            }
            Op::Forget { .. } | Op::BatchForget { .. } | Op::Interrupt { .. } => {}
            _ => reply.error(libc::ENOSYS),
        }
    }
}

fn main() {
    let Some(mountpoint) = std::env::args_os().nth(1) else {
        eprintln!("usage: fuse_floor MOUNTPOINT (runs until it is unmounted)");
        std::process::exit(2);
    };
    let fs = Arc::new(FloorFs(Mutex::new(Floor::new())));
    let path = std::path::Path::new(&mountpoint);
    if let Err(e) = Session::mount(path, fs, &MountOptions::default()).and_then(Session::join) {
        eprintln!("fuse_floor: {}: {e}", path.display());
        std::process::exit(1);
    }
}
