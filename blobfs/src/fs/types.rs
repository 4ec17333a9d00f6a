//! The vocabulary of the file system's metadata: inode numbers, kinds,
//! attributes, errors and the chunk references of file data.

use serde::{Deserialize, Serialize};

/// An inode number. The root directory is [`ROOT`].
pub type Ino = u64;

/// The root directory's inode number (as FUSE expects).
pub const ROOT: Ino = 1;

/// The longest name of a directory entry, in bytes.
pub const NAME_MAX: usize = 255;

/// The longest symbolic link target, in bytes.
pub const SYMLINK_MAX: usize = 4095;

/// The most hard links an inode may have.
pub const LINK_MAX: u32 = 65_000;

/// The longest extended attribute name, in bytes.
pub const XATTR_NAME_MAX: usize = 255;

/// The largest extended attribute value, in bytes.
pub const XATTR_SIZE_MAX: usize = 64 * 1024;

/// The largest file, in bytes (the kernel's own limit for 64-bit offsets).
pub const FILE_SIZE_MAX: u64 = i64::MAX as u64;

/// Why a file system operation failed: a POSIX error number, as the kernel
/// and every gateway report it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errno(pub i32);

impl Errno {
    /// No such file or directory.
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// File exists.
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// Not a directory.
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    /// Is a directory.
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    /// Directory not empty.
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// File name too long.
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    /// Too many links.
    pub const EMLINK: Errno = Errno(libc::EMLINK);
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// Device or resource busy.
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    /// No data available (no such extended attribute).
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    /// Result too large (an extended attribute name too long).
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    /// Argument list too long (an extended attribute value too large).
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    /// Operation not supported (an extended attribute namespace we do not keep).
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    /// File too large.
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    /// No space left on device.
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    /// Input/output error.
    pub const EIO: Errno = Errno(libc::EIO);
    /// Stale file handle (an inode number that no longer exists).
    pub const ESTALE: Errno = Errno(libc::ESTALE);
    /// Not a regular file (fallocate of a device node, fifo, socket).
    pub const ENODEV: Errno = Errno(libc::ENODEV);
}

impl std::fmt::Debug for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            libc::ENOENT => "ENOENT",
            libc::EEXIST => "EEXIST",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::ENOTEMPTY => "ENOTEMPTY",
            libc::EINVAL => "EINVAL",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            libc::EMLINK => "EMLINK",
            libc::EPERM => "EPERM",
            libc::EBUSY => "EBUSY",
            libc::ENODATA => "ENODATA",
            libc::ERANGE => "ERANGE",
            libc::E2BIG => "E2BIG",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::EFBIG => "EFBIG",
            libc::ENOSPC => "ENOSPC",
            libc::EIO => "EIO",
            libc::ESTALE => "ESTALE",
            n => return write!(f, "errno {n}"),
        };
        f.write_str(name)
    }
}

impl std::error::Error for Errno {}

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix domain socket.
    Socket,
    /// A character device node.
    CharDev,
    /// A block device node.
    BlockDev,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDev => libc::S_IFCHR,
            FileKind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind named by a mode's `S_IFMT` bits (0 means a regular file, as
    /// for mknod(2)).
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            0 | libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            _ => return None,
        })
    }
}

/// A point in time: nanoseconds since the Unix epoch (negative before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Time(pub i64);

impl Time {
    /// The current time (of this host's clock).
    pub fn now() -> Time {
        Time::from(std::time::SystemTime::now())
    }

    /// Seconds and nanoseconds, as `struct timespec` has them.
    pub fn split(self) -> (i64, u32) {
        (self.0.div_euclid(1_000_000_000), self.0.rem_euclid(1_000_000_000) as u32)
    }

    /// From seconds and nanoseconds.
    pub fn from_parts(secs: i64, nanos: u32) -> Time {
        Time(secs.saturating_mul(1_000_000_000).saturating_add(i64::from(nanos)))
    }
}

/// An inode's attributes, as `stat` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// What it is.
    pub kind: FileKind,
    /// Permission bits, with set-user-id, set-group-id and sticky (`0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (of a symlink: its target's length).
    pub size: u64,
    /// Hard links (a directory: 2 plus its subdirectories).
    pub nlink: u32,
    /// Last access.
    pub atime: Time,
    /// Last data change.
    pub mtime: Time,
    /// Last status change.
    pub ctime: Time,
    /// Creation.
    pub btime: Time,
    /// Device number of a device node.
    pub rdev: u32,
    /// Bumped each time the inode number is used again, so a stale handle
    /// to an earlier inode with the same number is recognised.
    pub generation: u64,
}

impl Attr {
    /// The full `st_mode`: kind and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | self.perm
    }
}

/// Where an extent of file data lives: a run of pages in a data blob. The
/// data path fills these in; the metadata keeps them and hands back the
/// ones an operation lets go of, so their space can be freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The data blob.
    pub blob: u64,
    /// First page in the blob.
    pub page: u64,
    /// Pages.
    pub pages: u32,
}

impl ChunkRef {
    /// `pages` pages of this run from its page `skip` on.
    pub fn sub(self, skip: u64, pages: u64) -> ChunkRef {
        debug_assert!(skip + pages <= u64::from(self.pages), "{pages} pages from {skip} of {self:?}");
        ChunkRef { page: self.page + skip, pages: pages as u32, ..self }
    }
}

impl From<std::time::SystemTime> for Time {
    fn from(t: std::time::SystemTime) -> Time {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Time(d.as_nanos().min(i64::MAX as u128) as i64),
            Err(e) => Time(-(e.duration().as_nanos().min(i64::MAX as u128) as i64)),
        }
    }
}

/// One directory entry, as readdir returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Resume a listing after this entry by passing it as the offset.
    pub cookie: u64,
    /// The entry's name.
    pub name: Vec<u8>,
    /// The inode it names.
    pub ino: Ino,
    /// What that inode is.
    pub kind: FileKind,
}

/// Who creates an inode, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creator {
    /// The caller's user id.
    pub uid: u32,
    /// The caller's group id.
    pub gid: u32,
    /// The time of the operation (chosen by the proposer, so every replica
    /// applies the same).
    pub now: Time,
}
