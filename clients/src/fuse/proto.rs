//! The FUSE wire protocol, as `include/uapi/linux/fuse.h` lays it out for
//! protocol 7.40: the requests a file system serves, decoded from the
//! kernel's bytes, and the replies, encoded. The same bytes travel over
//! `/dev/fuse` and over io_uring; only where they sit differs
//! ([`super::session`]): a request is its header, the operation's fixed
//! part (its "op header") and a tail of names or data, and a reply is an
//! out header and a body. All integers are in the host's byte order.

use std::fmt;
use std::time::Duration;

use blobfs::fs::{Attr, FileKind, Time};

/// The protocol version spoken: the kernel adapts to it.
pub const MAJOR: u32 = 7;
/// See [`MAJOR`].
pub const MINOR: u32 = 40;

/// Request opcodes.
#[allow(missing_docs)]
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
}

/// INIT flags (`flags | flags2 << 32`).
#[allow(missing_docs)]
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const WRITEBACK_CACHE: u64 = 1 << 16;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const POSIX_ACL: u64 = 1 << 20;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const HANDLE_KILLPRIV_V2: u64 = 1 << 33;
    pub const OVER_IO_URING: u64 = 1 << 41;
}

/// `setattr` valid bits.
#[allow(missing_docs)]
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// Open flags of a reply (`FOPEN_*`).
#[allow(missing_docs)]
pub mod fopen {
    pub const NOFLUSH: u32 = 1 << 5;
    pub const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
}

/// `write_flags` of a WRITE: the writer lacks CAP_FSETID.
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// `fsync_flags`: data only.
const FSYNC_FDATASYNC: u32 = 1;

/// Bytes of the request header.
pub const IN_HEADER: usize = 40;
/// Bytes of the reply header.
pub const OUT_HEADER: usize = 16;

/// What the kernel sent that cannot be a request.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed FUSE request: {}", self.0)
    }
}

fn malformed<T>(what: impl Into<String>) -> Result<T, Malformed> {
    Err(Malformed(what.into()))
}

/// Reads host-order integers and NUL-terminated names off a byte slice.
struct Cursor<'a> {
    b: &'a [u8],
    what: u32,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.b.len() < n {
            return malformed(format!("opcode {}: {} bytes where {n} were expected", self.what, self.b.len()));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_ne_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_ne_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A name: up to its NUL, which must be there.
    fn name(&mut self) -> Result<&'a [u8], Malformed> {
        let Some(end) = self.b.iter().position(|&c| c == 0) else {
            return malformed(format!("opcode {}: a name without its terminating NUL", self.what));
        };
        let name = &self.b[..end];
        self.b = &self.b[end + 1..];
        Ok(name)
    }
}

/// The request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes of the whole request (header included) over `/dev/fuse`.
    pub len: u32,
    /// What is asked ([`op`]).
    pub opcode: u32,
    /// The request's id, which its reply carries.
    pub unique: u64,
    /// The inode the request is about.
    pub nodeid: u64,
    /// The caller's user.
    pub uid: u32,
    /// The caller's group.
    pub gid: u32,
    /// The caller's process.
    pub pid: u32,
}

impl Header {
    /// Decodes the header at the start of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, Malformed> {
        if b.len() < IN_HEADER {
            return malformed(format!("a request of {} bytes, shorter than its header", b.len()));
        }
        let mut c = Cursor { b, what: 0 };
        let (len, opcode, unique, nodeid) = (c.u32()?, c.u32()?, c.u64()?, c.u64()?);
        let (uid, gid, pid) = (c.u32()?, c.u32()?, c.u32()?);
        Ok(Header { len, opcode, unique, nodeid, uid, gid, pid })
    }
}

/// Bytes of `opcode`'s op header: the part before its names or data.
/// Over io_uring the kernel puts it apart from the rest.
pub fn op_header_len(opcode: u32) -> usize {
    match opcode {
        op::FORGET | op::MKDIR | op::RENAME | op::LINK | op::OPEN | op::OPENDIR => 8,
        op::SETXATTR | op::GETXATTR | op::LISTXATTR | op::ACCESS | op::INTERRUPT | op::BATCH_FORGET => 8,
        op::GETATTR | op::MKNOD | op::FSYNC | op::FSYNCDIR | op::CREATE | op::RENAME2 => 16,
        op::RELEASE | op::RELEASEDIR | op::FLUSH => 24,
        op::FALLOCATE => 32,
        op::READ | op::WRITE | op::READDIR | op::READDIRPLUS => 40,
        op::INIT => 64,
        op::SETATTR => 88,
        _ => 0,
    }
}

/// What a SETATTR changes: the fields whose [`fattr`] bit is set in `valid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SetattrIn {
    pub valid: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl SetattrIn {
    /// The field if its bit is set in `valid`.
    pub fn get<T>(&self, bit: u32, v: T) -> Option<T> {
        (self.valid & bit != 0).then_some(v)
    }
}

/// A decoded request, borrowing its names and data from the buffer the
/// request arrived in.
#[derive(Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Destroy,
    Lookup {
        name: &'a [u8],
    },
    Forget {
        nlookup: u64,
    },
    /// (inode, lookups) pairs, 16 bytes each.
    BatchForget {
        items: &'a [u8],
    },
    Getattr,
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a [u8],
        target: &'a [u8],
    },
    Mknod {
        name: &'a [u8],
        mode: u32,
        rdev: u32,
        umask: u32,
    },
    Mkdir {
        name: &'a [u8],
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a [u8],
    },
    Rmdir {
        name: &'a [u8],
    },
    Rename {
        name: &'a [u8],
        newdir: u64,
        newname: &'a [u8],
        flags: u32,
    },
    Link {
        ino: u64,
        name: &'a [u8],
    },
    Open {
        flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
        write_flags: u32,
        flags: u32,
    },
    Statfs,
    Release {
        fh: u64,
    },
    Flush {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Setxattr {
        name: &'a [u8],
        value: &'a [u8],
        flags: i32,
    },
    Getxattr {
        name: &'a [u8],
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a [u8],
    },
    Opendir,
    Readdir {
        offset: u64,
        size: u32,
        plus: bool,
    },
    Releasedir,
    Fsyncdir,
    Access {
        mask: u32,
    },
    Create {
        name: &'a [u8],
        mode: u32,
        umask: u32,
        flags: u32,
    },
    Interrupt {
        unique: u64,
    },
    Fallocate {
        offset: u64,
        length: u64,
        mode: i32,
    },
    /// An opcode not served here: answered ENOSYS, which the kernel
    /// remembers for most.
    Other(u32),
}

impl<'a> Op<'a> {
    /// Decodes `opcode`'s arguments: `head`, its op header
    /// ([`op_header_len`] bytes; more are ignored), and `tail`, the names
    /// or data after it.
    pub fn decode(opcode: u32, head: &'a [u8], tail: &'a [u8]) -> Result<Op<'a>, Malformed> {
        let mut h = Cursor { b: head, what: opcode };
        let mut t = Cursor { b: tail, what: opcode };
        Ok(match opcode {
            op::INIT => {
                let (major, minor, max_readahead, flags) = (h.u32()?, h.u32()?, h.u32()?, h.u32()?);
                let flags2 = h.u32()?;
                let mut flags = u64::from(flags);
                if flags & init::INIT_EXT != 0 {
                    flags |= u64::from(flags2) << 32;
                }
                Op::Init { major, minor, max_readahead, flags }
            }
            op::DESTROY => Op::Destroy,
            op::LOOKUP => Op::Lookup { name: t.name()? },
            op::FORGET => Op::Forget { nlookup: h.u64()? },
            op::BATCH_FORGET => {
                let count = h.u32()? as usize;
                Op::BatchForget { items: t.take(count.checked_mul(16).ok_or_else(|| Malformed("count".into()))?)? }
            }
            op::GETATTR => Op::Getattr,
            op::SETATTR => {
                let (valid, _pad, _fh, size, _lock) = (h.u32()?, h.u32()?, h.u64()?, h.u64()?, h.u64()?);
                let (atime, mtime, _ctime) = (h.u64()?, h.u64()?, h.u64()?);
                let (atimensec, mtimensec, _ctimensec) = (h.u32()?, h.u32()?, h.u32()?);
                let (mode, _unused4, uid, gid) = (h.u32()?, h.u32()?, h.u32()?, h.u32()?);
                Op::Setattr(SetattrIn {
                    valid,
                    size,
                    atime: Time::from_parts(atime as i64, atimensec),
                    mtime: Time::from_parts(mtime as i64, mtimensec),
                    mode,
                    uid,
                    gid,
                })
            }
            op::READLINK => Op::Readlink,
            op::SYMLINK => Op::Symlink { name: t.name()?, target: t.name()? },
            op::MKNOD => {
                let (mode, rdev, umask) = (h.u32()?, h.u32()?, h.u32()?);
                Op::Mknod { name: t.name()?, mode, rdev, umask }
            }
            op::MKDIR => {
                let (mode, umask) = (h.u32()?, h.u32()?);
                Op::Mkdir { name: t.name()?, mode, umask }
            }
            op::UNLINK => Op::Unlink { name: t.name()? },
            op::RMDIR => Op::Rmdir { name: t.name()? },
            op::RENAME | op::RENAME2 => {
                let newdir = h.u64()?;
                let flags = if opcode == op::RENAME2 { h.u32()? } else { 0 };
                Op::Rename { name: t.name()?, newdir, newname: t.name()?, flags }
            }
            op::LINK => Op::Link { ino: h.u64()?, name: t.name()? },
            op::OPEN => Op::Open { flags: h.u32()? },
            op::OPENDIR => Op::Opendir,
            op::READ | op::READDIR | op::READDIRPLUS => {
                let (fh, offset, size) = (h.u64()?, h.u64()?, h.u32()?);
                match opcode {
                    op::READ => Op::Read { fh, offset, size },
                    _ => Op::Readdir { offset, size, plus: opcode == op::READDIRPLUS },
                }
            }
            op::WRITE => {
                let (fh, offset, size, write_flags, _lock, flags) =
                    (h.u64()?, h.u64()?, h.u32()?, h.u32()?, h.u64()?, h.u32()?);
                Op::Write { fh, offset, data: t.take(size as usize)?, write_flags, flags }
            }
            op::STATFS => Op::Statfs,
            op::RELEASE => Op::Release { fh: h.u64()? },
            op::RELEASEDIR => Op::Releasedir,
            op::FLUSH => Op::Flush { fh: h.u64()? },
            op::FSYNC => Op::Fsync { fh: h.u64()?, datasync: h.u32()? & FSYNC_FDATASYNC != 0 },
            op::FSYNCDIR => Op::Fsyncdir,
            op::SETXATTR => {
                let (size, flags) = (h.u32()?, h.u32()?);
                Op::Setxattr { name: t.name()?, value: t.take(size as usize)?, flags: flags as i32 }
            }
            op::GETXATTR => {
                let size = h.u32()?;
                Op::Getxattr { name: t.name()?, size }
            }
            op::LISTXATTR => Op::Listxattr { size: h.u32()? },
            op::REMOVEXATTR => Op::Removexattr { name: t.name()? },
            op::ACCESS => Op::Access { mask: h.u32()? },
            op::CREATE => {
                let (flags, mode, umask) = (h.u32()?, h.u32()?, h.u32()?);
                Op::Create { name: t.name()?, mode, umask, flags }
            }
            op::INTERRUPT => Op::Interrupt { unique: h.u64()? },
            op::FALLOCATE => {
                let (_fh, offset, length, mode) = (h.u64()?, h.u64()?, h.u64()?, h.u32()?);
                Op::Fallocate { offset, length, mode: mode as i32 }
            }
            other => Op::Other(other),
        })
    }

    /// Whether the kernel waits for no reply.
    pub fn unanswered(&self) -> bool {
        matches!(self, Op::Forget { .. } | Op::BatchForget { .. } | Op::Interrupt { .. })
    }
}

/// The inode and lookup count of each of a BATCH_FORGET's items.
pub fn forgets(items: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    items.chunks_exact(16).map(|c| {
        let n = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        (n(&c[..8]), n(&c[8..]))
    })
}

/// Bytes of `fuse_attr`.
const ATTR: usize = 88;
/// Bytes of `fuse_entry_out`.
pub const ENTRY_OUT: usize = 40 + ATTR;

/// Appends host-order integers.
struct Out<'a>(&'a mut Vec<u8>);

impl Out<'_> {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
}

fn put_attr(o: &mut Out<'_>, a: &Attr) {
    let (atime, mtime, ctime) = (a.atime.split(), a.mtime.split(), a.ctime.split());
    o.u64(a.ino).u64(a.size).u64(a.size.div_ceil(512));
    o.u64(atime.0 as u64).u64(mtime.0 as u64).u64(ctime.0 as u64);
    o.u32(atime.1).u32(mtime.1).u32(ctime.1);
    o.u32(a.kind.mode_bits() | (a.perm & 0o7777)).u32(a.nlink).u32(a.uid).u32(a.gid).u32(a.rdev);
    o.u32(4096).u32(0);
}

/// `fuse_entry_out`: `a`, valid for `ttl`.
pub fn put_entry(v: &mut Vec<u8>, a: &Attr, ttl: Duration) {
    let o = &mut Out(v);
    o.u64(a.ino).u64(a.generation).u64(ttl.as_secs()).u64(ttl.as_secs());
    o.u32(ttl.subsec_nanos()).u32(ttl.subsec_nanos());
    put_attr(o, a);
}

/// `fuse_attr_out`.
pub fn put_attr_out(v: &mut Vec<u8>, a: &Attr, ttl: Duration) {
    let o = &mut Out(v);
    o.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
    put_attr(o, a);
}

/// `fuse_open_out`.
pub fn put_open(v: &mut Vec<u8>, fh: u64, flags: u32) {
    Out(v).u64(fh).u32(flags).u32(0);
}

/// `fuse_write_out`.
pub fn put_written(v: &mut Vec<u8>, size: u32) {
    Out(v).u32(size).u32(0);
}

/// `fuse_getxattr_out`: the size a value or name list needs.
pub fn put_xattr_size(v: &mut Vec<u8>, size: u32) {
    Out(v).u32(size).u32(0);
}

/// What STATFS reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// `fuse_statfs_out`.
pub fn put_statfs(v: &mut Vec<u8>, s: &Statfs) {
    let o = &mut Out(v);
    o.u64(s.blocks).u64(s.bfree).u64(s.bavail).u64(s.files).u64(s.ffree);
    o.u32(s.bsize).u32(s.namelen).u32(s.frsize).u32(0);
    for _ in 0..6 {
        o.u32(0);
    }
}

/// Appends a directory entry (`fuse_dirent`, or `fuse_direntplus` with
/// `plus` = the entry's attributes and generation) if it fits in `max`
/// bytes in all; false if it does not.
pub fn put_dirent(
    v: &mut Vec<u8>,
    max: usize,
    ino: u64,
    cookie: u64,
    kind: FileKind,
    name: &[u8],
    plus: Option<(&Attr, Duration)>,
) -> bool {
    let dirent = (24 + name.len()).next_multiple_of(8);
    let len = dirent + if plus.is_some() { ENTRY_OUT } else { 0 };
    if v.len() + len > max {
        return false;
    }
    if let Some((a, ttl)) = plus {
        put_entry(v, a, ttl);
    }
    Out(v).u64(ino).u64(cookie).u32(name.len() as u32).u32(kind.mode_bits() >> 12);
    v.extend_from_slice(name);
    v.resize(v.len() + dirent - 24 - name.len(), 0);
    true
}

/// The INIT reply's fields.
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub struct InitOut {
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub max_pages: u16,
}

/// `fuse_init_out`.
pub fn put_init(v: &mut Vec<u8>, i: &InitOut) {
    let o = &mut Out(v);
    o.u32(MAJOR).u32(MINOR).u32(i.max_readahead).u32(i.flags as u32);
    o.u32(u32::from(i.max_background) | u32::from(i.congestion_threshold) << 16);
    // time_gran 1 ns; max_pages and map_alignment 0.
    o.u32(i.max_write).u32(1).u32(u32::from(i.max_pages));
    o.u32((i.flags >> 32) as u32);
    for _ in 0..7 {
        o.u32(0);
    }
}

/// The reply header.
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER] {
    let mut h = [0; OUT_HEADER];
    h[..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..].copy_from_slice(&unique.to_ne_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32s(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    #[test]
    fn header_and_names_decode_and_refuse_short_or_unterminated_input() {
        let mut b = u32s(&[56, op::LOOKUP]);
        b.extend(7u64.to_ne_bytes());
        b.extend(1u64.to_ne_bytes());
        b.extend(u32s(&[1000, 100, 42, 0]));
        b.extend(b"name\0");
        let h = Header::parse(&b).unwrap();
        assert_eq!((h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid), (op::LOOKUP, 7, 1, 1000, 100, 42));
        assert_eq!(Op::decode(op::LOOKUP, &[], &b[IN_HEADER..]).unwrap(), Op::Lookup { name: b"name" });
        assert!(Header::parse(&b[..39]).is_err());
        assert!(Op::decode(op::LOOKUP, &[], b"name").unwrap_err().0.contains("NUL"));
        // A WRITE whose data is shorter than it says.
        let mut w = vec![0u8; 40];
        w[16..20].copy_from_slice(&10u32.to_ne_bytes());
        assert!(Op::decode(op::WRITE, &w, b"short").is_err());
        assert!(Op::decode(op::MKNOD, &[0; 8], b"x\0").is_err());
        assert_eq!(Op::decode(99, &[], &[]).unwrap(), Op::Other(99));
    }

    #[test]
    fn ops_decode_their_fields() {
        let mut create = u32s(&[libc::O_WRONLY as u32, 0o100644, 0o022, 0]);
        create.truncate(op_header_len(op::CREATE));
        assert_eq!(
            Op::decode(op::CREATE, &create, b"f\0").unwrap(),
            Op::Create { name: b"f", mode: 0o100644, umask: 0o022, flags: libc::O_WRONLY as u32 }
        );
        let mut rename = 9u64.to_ne_bytes().to_vec();
        rename.extend(u32s(&[libc::RENAME_NOREPLACE, 0]));
        assert_eq!(
            Op::decode(op::RENAME2, &rename, b"a\0b\0").unwrap(),
            Op::Rename { name: b"a", newdir: 9, newname: b"b", flags: libc::RENAME_NOREPLACE }
        );
        let mut write = [3u64, 4096].iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        write.extend(u32s(&[3, WRITE_KILL_SUIDGID, 0, 0, libc::O_DIRECT as u32, 0]));
        assert_eq!(
            Op::decode(op::WRITE, &write, b"abcdef").unwrap(),
            Op::Write {
                fh: 3,
                offset: 4096,
                data: b"abc",
                write_flags: WRITE_KILL_SUIDGID,
                flags: libc::O_DIRECT as u32
            }
        );
        let mut batch = u32s(&[2, 0]);
        batch.truncate(8);
        let items: Vec<u8> = [5u64, 1, 6, 2].iter().flat_map(|x| x.to_ne_bytes()).collect();
        let Op::BatchForget { items } = Op::decode(op::BATCH_FORGET, &batch, &items).unwrap() else { panic!() };
        assert_eq!(forgets(items).collect::<Vec<_>>(), [(5, 1), (6, 2)]);
        let mut setattr = vec![0u8; 88];
        setattr[..4].copy_from_slice(&(fattr::SIZE | fattr::MODE).to_ne_bytes());
        setattr[16..24].copy_from_slice(&77u64.to_ne_bytes());
        setattr[68..72].copy_from_slice(&0o4755u32.to_ne_bytes());
        let Op::Setattr(s) = Op::decode(op::SETATTR, &setattr, &[]).unwrap() else { panic!() };
        assert_eq!(
            (s.get(fattr::SIZE, s.size), s.get(fattr::MODE, s.mode), s.get(fattr::UID, s.uid)),
            (Some(77), Some(0o4755), None)
        );
    }

    #[test]
    fn replies_have_the_kernels_sizes_and_dirents_stop_at_the_limit() {
        let a = Attr {
            ino: 2,
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size: 1000,
            nlink: 1,
            atime: Time::from_parts(-1, 5),
            mtime: Time(0),
            ctime: Time(0),
            btime: Time(0),
            rdev: 0,
            generation: 3,
        };
        let ttl = Duration::from_secs(1);
        let mut v = Vec::new();
        put_entry(&mut v, &a, ttl);
        assert_eq!(v.len(), ENTRY_OUT);
        // The mode: regular file, 0644; blocks rounded up; atime signed.
        assert_eq!(&v[40 + 60..40 + 64], &(libc::S_IFREG | 0o644).to_ne_bytes());
        assert_eq!(&v[40 + 16..40 + 24], &2u64.to_ne_bytes());
        assert_eq!(&v[40 + 24..40 + 32], &(-1i64).to_ne_bytes());
        let mut v = Vec::new();
        put_attr_out(&mut v, &a, ttl);
        assert_eq!(v.len(), 104);
        let mut v = Vec::new();
        put_statfs(
            &mut v,
            &Statfs { blocks: 1, bfree: 1, bavail: 1, files: 1, ffree: 1, bsize: 4096, namelen: 255, frsize: 4096 },
        );
        assert_eq!(v.len(), 80);
        let mut v = Vec::new();
        put_init(
            &mut v,
            &InitOut {
                max_readahead: 0,
                flags: 0,
                max_background: 16,
                congestion_threshold: 12,
                max_write: 1 << 20,
                max_pages: 256,
            },
        );
        assert_eq!(v.len(), 64);
        let mut v = Vec::new();
        assert!(put_dirent(&mut v, 64, 5, 1, FileKind::Dir, b"abc", None));
        assert_eq!(v.len(), 32);
        assert!(!put_dirent(&mut v, 64, 6, 2, FileKind::File, b"a-longer-name", None));
        assert_eq!(v.len(), 32);
        assert!(put_dirent(&mut v, 1024, 6, 2, FileKind::File, b"x", Some((&a, ttl))));
        assert_eq!(v.len(), 32 + ENTRY_OUT + 32);
    }
}
