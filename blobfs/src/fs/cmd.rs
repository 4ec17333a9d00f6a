//! The commands that change the file system's metadata, and their replies.
//!
//! A command carries everything its effect depends on (the caller's ids, the
//! time), so that applying the same log of commands to the same state gives
//! the same state on every replica: it is what the Raft log holds.

use serde::{Deserialize, Serialize};

use super::reduced::{NewFrame, View};
use super::types::{Attr, ChunkRef, Creator, FileKind, Ino, Time};
use crate::reduce::ChunkHash;

/// `rename` flags (renameat2(2)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RenameMode {
    /// Replace the target if it exists (rename(2)).
    #[default]
    Replace,
    /// Fail with EEXIST if the target exists (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap source and target, both of which must exist (`RENAME_EXCHANGE`).
    Exchange,
}

/// How `setxattr` treats an existing attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum XattrMode {
    /// Create or replace.
    #[default]
    Upsert,
    /// Fail with EEXIST if it exists (`XATTR_CREATE`).
    Create,
    /// Fail with ENODATA if it does not (`XATTR_REPLACE`).
    Replace,
}

/// Which attributes a `setattr` changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    /// New permission bits (`0o7777`).
    pub perm: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend): pages past it are let go of.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<Time>,
    /// New modification time.
    pub mtime: Option<Time>,
    /// New creation time.
    pub btime: Option<Time>,
    /// With a size that ends inside a mapped page: the unit holding the new
    /// last byte rewritten with everything past the new end zeroed (unit
    /// index, where it now is), so the size and the data change together.
    pub tail: Option<(u64, ChunkRef)>,
}

/// What a change of owner, a truncate or a write takes away with it. The
/// file system drops these itself (FUSE's `HANDLE_KILLPRIV_V2`), as a
/// local file system's VFS does for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropPrivs {
    /// The file capabilities (the `security.capability` xattr) only: the
    /// changer may keep set-ID bits (it has `CAP_FSETID`).
    Caps,
    /// Those, and of a file that is not a directory, the set-user-ID bit,
    /// and the set-group-ID bit if its group may execute it (without, the
    /// bit marks mandatory locking, not a privilege).
    All,
}

/// A change to the metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmd {
    /// Creates a regular file, fifo, socket or device node (`create`, `mknod`).
    Mknod {
        /// The directory.
        parent: Ino,
        /// The new entry's name.
        name: Vec<u8>,
        /// What to create (not a directory or symlink).
        kind: FileKind,
        /// Permission bits, umask applied.
        perm: u32,
        /// Device number, for device nodes.
        rdev: u32,
        /// Who and when.
        by: Creator,
    },
    /// Creates a directory.
    Mkdir {
        /// The parent.
        parent: Ino,
        /// Its name.
        name: Vec<u8>,
        /// Permission bits, umask applied.
        perm: u32,
        /// Who and when.
        by: Creator,
    },
    /// Creates a symbolic link.
    Symlink {
        /// The directory.
        parent: Ino,
        /// The link's name.
        name: Vec<u8>,
        /// What it points to.
        target: Vec<u8>,
        /// Who and when.
        by: Creator,
    },
    /// Adds a hard link to an inode.
    Link {
        /// The inode.
        ino: Ino,
        /// The directory of the new name.
        parent: Ino,
        /// The new name.
        name: Vec<u8>,
        /// When.
        now: Time,
    },
    /// Removes a name of a non-directory.
    Unlink {
        /// The directory.
        parent: Ino,
        /// The name.
        name: Vec<u8>,
        /// When.
        now: Time,
    },
    /// Removes an empty directory.
    Rmdir {
        /// The parent.
        parent: Ino,
        /// The directory's name.
        name: Vec<u8>,
        /// When.
        now: Time,
    },
    /// Renames (moves, replaces, or exchanges) an entry.
    Rename {
        /// The source directory.
        parent: Ino,
        /// The source name.
        name: Vec<u8>,
        /// The target directory.
        new_parent: Ino,
        /// The target name.
        new_name: Vec<u8>,
        /// Replace, no-replace or exchange.
        mode: RenameMode,
        /// When.
        now: Time,
    },
    /// Changes attributes.
    SetAttr {
        /// The inode.
        ino: Ino,
        /// What to change.
        set: SetAttr,
        /// When (the new ctime; the mtime too where the size changes and
        /// no mtime is given).
        now: Time,
    },
    /// Sets an extended attribute.
    SetXattr {
        /// The inode.
        ino: Ino,
        /// The attribute's full name (`user.x`, `security.selinux`, ...).
        name: Vec<u8>,
        /// Its value.
        value: Vec<u8>,
        /// Create, replace or either.
        mode: XattrMode,
        /// When (the new ctime).
        now: Time,
    },
    /// Removes an extended attribute.
    RemoveXattr {
        /// The inode.
        ino: Ino,
        /// The attribute's full name.
        name: Vec<u8>,
        /// When (the new ctime).
        now: Time,
    },
    /// Records written file data: maps extents and grows the size.
    Write {
        /// The file.
        ino: Ino,
        /// Extents: first unit (offset / chunk size) and where the data of
        /// the units from there on now is; each replaces whole units.
        chunks: Vec<(u64, ChunkRef)>,
        /// The file's size is at least this afterwards.
        end: u64,
        /// When (mtime and ctime).
        now: Time,
    },
    /// Frees orphans: inodes without links that nobody has open any more
    /// (after the last close, or at start-up for those a crash left behind).
    Reclaim {
        /// The inodes.
        inos: Vec<Ino>,
    },
    // New variants go last: the log stores the variant's index.
    /// [`Cmd::PunchRange`] with the holes as a list of units, as builds
    /// before it wrote them (kept so that their logs still replay).
    Punch {
        /// The file.
        ino: Ino,
        /// Units unmapped (holes now).
        holes: Vec<u64>,
        /// Extents replacing units at the edges, as in [`Cmd::Write`].
        chunks: Vec<(u64, ChunkRef)>,
        /// When (mtime and ctime).
        now: Time,
    },
    /// Zeroes a range of a file without changing its size (fallocate's
    /// punch-hole and zero-range): units wholly inside the range are
    /// unmapped, the units at its edges replaced by copies with the range
    /// zeroed.
    PunchRange {
        /// The file.
        ino: Ino,
        /// Units `[first, end)` unmapped (holes now).
        holes: (u64, u64),
        /// Extents replacing units at the edges, as in [`Cmd::Write`].
        chunks: Vec<(u64, ChunkRef)>,
        /// When (mtime and ctime).
        now: Time,
    },
    /// Records reduced data written to a reduced file (docs/reduce.md):
    /// stores the frames of new segments whose chunks the index does not
    /// hold yet, and replaces the bytes `[from, to)` of the file by `views`
    /// (none: a hole).
    ReduceWrite {
        /// The file.
        ino: Ino,
        /// First byte replaced.
        from: u64,
        /// End of the bytes replaced.
        to: u64,
        /// The new views, by offset, within `[from, to)`.
        views: Vec<(u64, View)>,
        /// Segments written for this command, each with the frames in it.
        segments: Vec<(ChunkRef, Vec<NewFrame>)>,
        /// The file's size is at least this afterwards.
        end: u64,
        /// When (mtime and ctime).
        now: Time,
    },
    /// Garbage collection: the frames of chunks copied into a new segment;
    /// each `(chunk, old segment, offset in the new one)` still stored in
    /// its old segment moves.
    ReduceMove {
        /// The new segment.
        segment: ChunkRef,
        /// The moves.
        moves: Vec<(ChunkHash, u64, u32)>,
    },
    /// The audit's repair: sets chunks' reference counts (a chunk set to 0
    /// leaves the index) and the logical byte count.
    ReduceRepair {
        /// Chunk → the number of views that name it.
        refs: Vec<(ChunkHash, u64)>,
        /// Bytes all views hold.
        logical: u64,
    },
    /// [`Cmd::SetAttr`], then drops `drop` in the same step, so no state
    /// shows a file with a new owner or new bytes and its old privileges.
    SetAttrDropping {
        /// The inode.
        ino: Ino,
        /// What to change (nothing, for a write).
        set: SetAttr,
        /// What goes.
        drop: DropPrivs,
        /// When.
        now: Time,
    },
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// An inode was created or linked: its attributes now.
    Entry(Attr),
    /// Attributes after a change, and the chunks it let go of (a truncate,
    /// an overwrite that moved a chunk): their space may be freed.
    Attr(Attr, Vec<ChunkRef>),
    /// Names were removed or replaced; the inodes whose last link went are
    /// orphans now (to be reclaimed when nobody has them open).
    Removed {
        /// New orphans.
        orphaned: Vec<Ino>,
    },
    /// Orphans were reclaimed: the chunks of their data, to be freed.
    Freed(Vec<ChunkRef>),
    /// Done, nothing to report.
    Done,
}
