//! The metadata state machine: inodes, directories, links, xattrs, orphans
//! and each file's extent map, changed only by [`Cmd`]s.
//!
//! A file's map counts in *units* of the chunk size (4 KiB on a new file
//! system; 1 MiB on those made before extents, whose maps this reads
//! unchanged): an extent keyed by unit `k` holds the file's pages from
//! `k × unit` on, as many as its run of pool pages has. Extents never
//! overlap; a command that maps an extent replaces whole units, cutting
//! the extents it overlaps, and a truncate trims the extent it ends in.
//!
//! `apply` is deterministic: the same commands applied in the same order to
//! the same state give the same state and the same replies, which is what
//! replicating it by Raft needs. Permission checks are not made here: the
//! FUSE mount lets the kernel make them (`default_permissions`), and the
//! gateways that cannot do the same check before proposing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::cmd::{Cmd, DropPrivs, RenameMode, Reply, SetAttr, XattrMode};
use super::reduced::{ReduceIndex, View};
use super::types::*;
use crate::reduce::ReducePolicy;

/// The xattr holding a directory's or a file's data-reduction policy (its
/// canonical text form; docs/reduce.md). New files and directories take
/// their parent's.
pub const POLICY_XATTR: &[u8] = b"claudefs.reduce";

/// Bytes per page of file data.
const PAGE: u64 = crate::format::PAGE_SIZE as u64;

/// The extents of a file without any.
static NO_EXTENTS: BTreeMap<u64, ChunkRef> = BTreeMap::new();

/// Readdir cookies 1 and 2 are `.` and `..`; entries start at 3.
const FIRST_COOKIE: u64 = 3;

/// What an inode holds besides its attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Body {
    File {
        /// First unit → where the data of its pages is. Pages no extent
        /// holds are holes.
        chunks: BTreeMap<u64, ChunkRef>,
    },
    Dir {
        parent: Ino,
        /// Name → (cookie, inode).
        entries: BTreeMap<Vec<u8>, (u64, Ino)>,
        /// Cookie → name: readdir's order, stable while entries come and go.
        by_cookie: BTreeMap<u64, Vec<u8>>,
        next_cookie: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Fifos, sockets and device nodes.
    Special,
    // New variants go last: snapshots store the variant's index.
    /// A regular file whose data is reduced (docs/reduce.md): byte offset →
    /// the view of a chunk holding the bytes from there on. Bytes no view
    /// holds are holes.
    Reduced {
        /// The views, by offset; they never overlap.
        views: BTreeMap<u64, View>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Inode {
    attr: Attr,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    body: Body,
}

/// Counts for statfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Inodes in use (orphans included).
    pub inodes: u64,
    /// Pages of file data mapped by extents.
    pub data_pages: u64,
}

/// The file system's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    inodes: BTreeMap<Ino, Inode>,
    /// Inodes without links, kept while open (and until reclaimed).
    orphans: BTreeSet<Ino>,
    next_ino: Ino,
    /// Generation for the next inode created.
    next_generation: u64,
    chunk_size: u64,
    usage: Usage,
    /// The dedupe index and its segments. Not in the derived encoding:
    /// snapshots append it (see [`super::raft`]), so that snapshots made
    /// before it existed still load.
    #[serde(skip)]
    reduce: ReduceIndex,
}

impl MetaState {
    /// A new file system: an empty root directory owned by `root_uid:root_gid`
    /// with permissions `0o755`. File data is mapped in units of
    /// `chunk_size` bytes (a multiple of 4 KiB).
    pub fn new(chunk_size: u64, root_uid: u32, root_gid: u32, now: Time) -> MetaState {
        assert!(chunk_size >= 4096 && chunk_size % 4096 == 0, "chunk size {chunk_size} is not a multiple of 4 KiB");
        let mut s = MetaState {
            inodes: BTreeMap::new(),
            orphans: BTreeSet::new(),
            next_ino: ROOT,
            next_generation: 1,
            chunk_size,
            usage: Usage::default(),
            reduce: ReduceIndex::default(),
        };
        let by = Creator { uid: root_uid, gid: root_gid, now };
        let root = s.new_inode(FileKind::Dir, 0o755, 0, by, Body::dir(ROOT));
        debug_assert_eq!(root, ROOT);
        s.inode_mut(ROOT).attr.nlink = 2;
        s
    }

    /// The unit of file maps, in bytes: writes replace whole units.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Pages per unit.
    fn unit_pages(&self) -> u64 {
        self.chunk_size / PAGE
    }

    /// Inode and data counts.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Inodes without links, kept until reclaimed.
    pub fn orphans(&self) -> impl Iterator<Item = Ino> + '_ {
        self.orphans.iter().copied()
    }

    // --- queries --------------------------------------------------------

    /// An inode's attributes.
    pub fn getattr(&self, ino: Ino) -> Result<&Attr, Errno> {
        self.inodes.get(&ino).map(|i| &i.attr).ok_or(Errno::ENOENT)
    }

    /// The inode `name` names in directory `parent` (`.` and `..` included).
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<&Attr, Errno> {
        let ino = self.lookup_ino(parent, name)?;
        self.getattr(ino)
    }

    /// Entries of a directory after cookie `offset` (0: from the start,
    /// with `.` and `..`), at most `max`. Cookies stay valid while other
    /// entries are added and removed: a listing resumed from one neither
    /// repeats nor skips an entry that stayed.
    pub fn readdir(&self, dir: Ino, offset: u64, max: usize) -> Result<Vec<DirEntry>, Errno> {
        let inode = self.inodes.get(&dir).ok_or(Errno::ENOENT)?;
        let Body::Dir { parent, entries, by_cookie, .. } = &inode.body else { return Err(Errno::ENOTDIR) };
        let mut out = Vec::new();
        if offset < 1 {
            out.push(DirEntry { cookie: 1, name: b".".to_vec(), ino: dir, kind: FileKind::Dir });
        }
        if offset < 2 {
            out.push(DirEntry { cookie: 2, name: b"..".to_vec(), ino: *parent, kind: FileKind::Dir });
        }
        for (&cookie, name) in by_cookie.range(offset.max(FIRST_COOKIE - 1) + 1..) {
            if out.len() >= max {
                break;
            }
            let ino = entries[name].1;
            out.push(DirEntry { cookie, name: name.clone(), ino, kind: self.inodes[&ino].attr.kind });
        }
        out.truncate(max);
        Ok(out)
    }

    /// A symbolic link's target.
    pub fn readlink(&self, ino: Ino) -> Result<&[u8], Errno> {
        match &self.inodes.get(&ino).ok_or(Errno::ENOENT)?.body {
            Body::Symlink { target } => Ok(target),
            _ => Err(Errno::EINVAL),
        }
    }

    /// An extended attribute's value.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<&[u8], Errno> {
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        check_xattr_name(name)?;
        inode.xattrs.get(name).map(Vec::as_slice).ok_or(Errno::ENODATA)
    }

    /// The names of an inode's extended attributes.
    pub fn listxattr(&self, ino: Ino) -> Result<impl Iterator<Item = &[u8]>, Errno> {
        Ok(self.inodes.get(&ino).ok_or(Errno::ENOENT)?.xattrs.keys().map(Vec::as_slice))
    }

    /// Every extent of every file (to rebuild the data allocator).
    pub fn all_chunks(&self) -> impl Iterator<Item = ChunkRef> + '_ {
        self.inodes
            .values()
            .flat_map(|i| match &i.body {
                Body::File { chunks } => Some(chunks.values().copied()),
                _ => None,
            })
            .flatten()
            .chain(self.reduce.runs())
    }

    /// The dedupe index and its segments.
    pub fn reduce_index(&self) -> &ReduceIndex {
        &self.reduce
    }

    /// Replaces the dedupe index (loading a snapshot).
    pub(crate) fn set_reduce_index(&mut self, index: ReduceIndex) {
        self.reduce = index;
    }

    /// Whether `ino` is a reduced file (its data in views).
    pub fn is_reduced(&self, ino: Ino) -> Result<bool, Errno> {
        Ok(matches!(self.inodes.get(&ino).ok_or(Errno::ENOENT)?.body, Body::Reduced { .. }))
    }

    /// Whether dropping `drop` from `ino` would change anything (a write
    /// needs no command for it then).
    pub fn would_drop(&self, ino: Ino, drop: DropPrivs) -> Result<bool, Errno> {
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        Ok(dropped_set_ids(&inode.attr, drop) != 0 || inode.xattrs.contains_key(CAPS_XATTR))
    }

    /// The policy of a reduced file (`None` for a file stored plainly).
    pub fn reduce_policy(&self, ino: Ino) -> Result<Option<ReducePolicy>, Errno> {
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        match inode.body {
            Body::Reduced { .. } => Ok(Some(policy_of(inode).ok_or(Errno::EIO)?)),
            _ => Ok(None),
        }
    }

    /// The views of a reduced file reaching into `[from, to)`, in order,
    /// each with its offset.
    pub fn views(&self, ino: Ino, from: u64, to: u64) -> Result<Vec<(u64, View)>, Errno> {
        match &self.inodes.get(&ino).ok_or(Errno::ENOENT)?.body {
            Body::Reduced { views } => Ok(super::reduced::overlapping(views, from, to).collect()),
            Body::Dir { .. } => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }

    /// Every view of every reduced file, with the file.
    pub fn all_views(&self) -> impl Iterator<Item = (Ino, u64, &View)> + '_ {
        self.inodes
            .iter()
            .flat_map(|(&ino, i)| match &i.body {
                Body::Reduced { views } => Some(views.iter().map(move |(&k, v)| (ino, k, v))),
                _ => None,
            })
            .flatten()
    }

    /// A file's extents holding any of its pages from `page` on, in order,
    /// each as its first page and its run (holes are missing).
    pub fn extents(&self, ino: Ino, page: u64) -> Result<impl Iterator<Item = (u64, ChunkRef)> + '_, Errno> {
        let up = self.unit_pages();
        let chunks = match &self.inodes.get(&ino).ok_or(Errno::ENOENT)?.body {
            Body::File { chunks } => chunks,
            // A reduced file has no extents: its data is in views.
            Body::Reduced { .. } => &NO_EXTENTS,
            Body::Dir { .. } => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        };
        // The extent starting before `page` may reach into it.
        let first = chunks
            .range(..page / up + 1)
            .next_back()
            .filter(|&(&k, c)| k * up + u64::from(c.pages) > page)
            .map_or(page.div_ceil(up), |(&k, _)| k);
        Ok(chunks.range(first..).map(move |(&k, &c)| (k * up, c)))
    }

    /// Checks the structure: every entry names a live inode, every inode's
    /// link count matches the entries naming it (a directory: 2 plus its
    /// subdirectories), each directory's `..` is the one holding it, inodes
    /// without links are exactly the orphans, nothing is unreachable, and
    /// the usage counts add up. Returns the first discrepancy, described.
    pub fn check(&self) -> Result<(), String> {
        if !matches!(self.inodes.get(&ROOT).map(|i| &i.body), Some(Body::Dir { .. })) {
            return Err("the root is missing or not a directory".into());
        }
        let mut links: BTreeMap<Ino, u32> = BTreeMap::new();
        let mut pages = 0;
        for (&ino, inode) in &self.inodes {
            if inode.attr.ino != ino {
                return Err(format!("inode {ino} says it is {}", inode.attr.ino));
            }
            match &inode.body {
                Body::Dir { entries, by_cookie, .. } => {
                    if entries.len() != by_cookie.len() {
                        return Err(format!("directory {ino}: {} entries, {} cookies", entries.len(), by_cookie.len()));
                    }
                    for (name, &(cookie, child)) in entries {
                        if by_cookie.get(&cookie) != Some(name) {
                            return Err(format!("directory {ino}: cookie {cookie} does not name its entry"));
                        }
                        let Some(c) = self.inodes.get(&child) else {
                            return Err(format!("directory {ino}: entry {:?} names no inode ({child})", lossy(name)));
                        };
                        if let Body::Dir { parent, .. } = c.body {
                            if parent != ino {
                                return Err(format!("directory {child}: .. is {parent}, but {ino} holds it"));
                            }
                            *links.entry(ino).or_default() += 1;
                        }
                        *links.entry(child).or_default() += 1;
                    }
                }
                Body::File { chunks } => {
                    let up = self.unit_pages();
                    let mut next = 0;
                    for (&k, c) in chunks {
                        let start = k.checked_mul(up).filter(|&s| s >= next && c.pages > 0);
                        let Some(end) = start.and_then(|s| s.checked_add(u64::from(c.pages))) else {
                            return Err(format!(
                                "file {ino}: extent at unit {k} ({} pages) overlaps, is empty or lies past the end",
                                c.pages
                            ));
                        };
                        next = end;
                        pages += u64::from(c.pages);
                    }
                }
                Body::Reduced { views } => {
                    let mut next = 0;
                    for (&k, v) in views {
                        if k < next || k.saturating_add(u64::from(v.len)) > inode.attr.size {
                            return Err(format!("file {ino}: view at {k} overlaps another or lies past the end"));
                        }
                        next = k + u64::from(v.len);
                    }
                }
                _ => {}
            }
        }
        pages += self.reduce.runs().map(|r| u64::from(r.pages)).sum::<u64>();
        self.reduce.check(self.all_views().map(|(_, _, v)| v))?;
        for (&ino, inode) in &self.inodes {
            let named = links.get(&ino).copied().unwrap_or(0);
            let want = match inode.attr.kind {
                FileKind::Dir if ino == ROOT => named + 2,
                FileKind::Dir if named == 0 => 0,
                FileKind::Dir => named + 1,
                _ => named,
            };
            if inode.attr.nlink != want {
                return Err(format!("inode {ino}: nlink {}, but {want} by its entries", inode.attr.nlink));
            }
            if (want == 0) != self.orphans.contains(&ino) {
                return Err(format!("inode {ino}: {want} links, orphan: {}", self.orphans.contains(&ino)));
            }
        }
        if self.orphans.iter().any(|o| !self.inodes.contains_key(o)) {
            return Err("an orphan is not an inode".into());
        }
        // Reachability: every linked inode is reachable from the root.
        let mut seen = BTreeSet::from([ROOT]);
        let mut todo = vec![ROOT];
        while let Some(d) = todo.pop() {
            if let Body::Dir { entries, .. } = &self.inodes[&d].body {
                for &(_, child) in entries.values() {
                    if seen.insert(child) && self.inodes[&child].attr.kind == FileKind::Dir {
                        todo.push(child);
                    }
                }
            }
        }
        if let Some(lost) = self.inodes.keys().find(|i| !seen.contains(i) && !self.orphans.contains(i)) {
            return Err(format!("inode {lost} has links but cannot be reached from the root"));
        }
        if self.usage != (Usage { inodes: self.inodes.len() as u64, data_pages: pages }) {
            return Err(format!("usage {:?}, but {} inodes and {pages} data pages", self.usage, self.inodes.len()));
        }
        Ok(())
    }

    // --- changes ----------------------------------------------------------

    /// Applies a command. A command that fails changes nothing.
    pub fn apply(&mut self, cmd: &Cmd) -> Result<Reply, Errno> {
        match cmd {
            Cmd::Mknod { parent, name, kind, perm, rdev, by } => {
                if matches!(kind, FileKind::Dir | FileKind::Symlink) {
                    return Err(Errno::EINVAL);
                }
                let body = if *kind == FileKind::File { Body::File { chunks: BTreeMap::new() } } else { Body::Special };
                let rdev = if matches!(kind, FileKind::CharDev | FileKind::BlockDev) { *rdev } else { 0 };
                self.create(*parent, name, *kind, *perm, rdev, *by, body)
            }
            Cmd::Mkdir { parent, name, perm, by } => {
                self.create(*parent, name, FileKind::Dir, *perm, 0, *by, Body::dir(*parent))
            }
            Cmd::Symlink { parent, name, target, by } => {
                if target.is_empty() {
                    return Err(Errno::ENOENT);
                }
                if target.len() > SYMLINK_MAX {
                    return Err(Errno::ENAMETOOLONG);
                }
                let body = Body::Symlink { target: target.clone() };
                self.create(*parent, name, FileKind::Symlink, 0o777, 0, *by, body)
            }
            Cmd::Link { ino, parent, name, now } => self.link(*ino, *parent, name, *now),
            Cmd::Unlink { parent, name, now } => self.remove(*parent, name, false, *now),
            Cmd::Rmdir { parent, name, now } => self.remove(*parent, name, true, *now),
            Cmd::Rename { parent, name, new_parent, new_name, mode, now } => {
                self.rename(*parent, name, *new_parent, new_name, *mode, *now)
            }
            Cmd::SetAttr { ino, set, now } => self.setattr(*ino, set, *now),
            Cmd::SetAttrDropping { ino, set, drop, now } => {
                let reply = self.setattr(*ino, set, *now)?;
                let inode = self.inodes.get_mut(ino).expect("setattr found it");
                inode.xattrs.remove(CAPS_XATTR);
                inode.attr.perm &= !dropped_set_ids(&inode.attr, *drop);
                match reply {
                    Reply::Attr(_, freed) => Ok(Reply::Attr(inode.attr.clone(), freed)),
                    r => unreachable!("setattr replies with attributes, not {r:?}"),
                }
            }
            Cmd::SetXattr { ino, name, value, mode, now } => self.setxattr(*ino, name, value, *mode, *now),
            Cmd::RemoveXattr { ino, name, now } => {
                let inode = self.inodes.get_mut(ino).ok_or(Errno::ENOENT)?;
                check_xattr_name(name)?;
                if !inode.xattrs.contains_key(name.as_slice()) {
                    return Err(Errno::ENODATA);
                }
                if name == POLICY_XATTR {
                    set_layout(inode, false)?;
                }
                inode.xattrs.remove(name.as_slice());
                inode.attr.ctime = *now;
                Ok(Reply::Done)
            }
            Cmd::Write { ino, chunks, end, now } => self.write(*ino, chunks, *end, *now),
            Cmd::Punch { ino, holes, chunks, now } => {
                let holes: Vec<_> = holes.iter().map(|&i| (i, i.saturating_add(1))).collect();
                self.remap(*ino, &holes, chunks, 0, *now)
            }
            Cmd::PunchRange { ino, holes, chunks, now } => self.remap(*ino, &[*holes], chunks, 0, *now),
            Cmd::Reclaim { inos } => {
                let mut freed = Vec::new();
                for ino in inos {
                    if self.orphans.remove(ino) {
                        let inode = self.inodes.remove(ino).expect("orphans are inodes");
                        self.usage.inodes -= 1;
                        match inode.body {
                            Body::File { chunks } => {
                                self.usage.data_pages -= pages(chunks.values());
                                freed.extend(chunks.into_values());
                            }
                            Body::Reduced { views } => {
                                let gone = self.reduce.release(views.into_values().collect());
                                self.usage.data_pages -= pages(&gone);
                                freed.extend(gone);
                            }
                            _ => {}
                        }
                    }
                }
                Ok(Reply::Freed(freed))
            }
            Cmd::ReduceWrite { ino, from, to, views, segments, end, now } => {
                if from > to {
                    return Err(Errno::EINVAL);
                }
                if *end > FILE_SIZE_MAX {
                    return Err(Errno::EFBIG);
                }
                let inode = self.inodes.get_mut(ino).ok_or(Errno::ENOENT)?;
                let Body::Reduced { views: map } = &mut inode.body else {
                    return Err(if inode.attr.kind == FileKind::Dir { Errno::EISDIR } else { Errno::EINVAL });
                };
                self.reduce.check_write(*from, *to, views, segments)?;
                let freed = self.reduce.write(map, *from, *to, views, segments);
                self.usage.data_pages += pages(segments.iter().map(|(run, _)| run));
                self.usage.data_pages -= pages(&freed);
                let a = &mut inode.attr;
                a.size = a.size.max(*end);
                a.mtime = *now;
                a.ctime = *now;
                Ok(Reply::Attr(a.clone(), freed))
            }
            Cmd::ReduceMove { segment, moves } => {
                let bytes = u64::from(segment.pages) * PAGE;
                if segment.pages == 0
                    || moves.iter().any(|&(h, _, off)| {
                        self.reduce.get(&h).is_some_and(|c| u64::from(off) + u64::from(c.len) > bytes)
                    })
                {
                    return Err(Errno::EINVAL);
                }
                let freed = self.reduce.relocate(*segment, moves);
                self.usage.data_pages += u64::from(segment.pages);
                self.usage.data_pages -= pages(&freed);
                Ok(Reply::Freed(freed))
            }
            Cmd::ReduceRepair { refs, logical } => {
                let freed = self.reduce.set_refs(refs);
                self.reduce.set_logical(*logical);
                self.usage.data_pages -= pages(&freed);
                Ok(Reply::Freed(freed))
            }
        }
    }

    // --- helpers ----------------------------------------------------------

    fn inode_mut(&mut self, ino: Ino) -> &mut Inode {
        self.inodes.get_mut(&ino).expect("a checked inode exists")
    }

    fn new_inode(&mut self, kind: FileKind, perm: u32, rdev: u32, by: Creator, body: Body) -> Ino {
        let attr = self.new_attr(kind, perm, rdev, by);
        let ino = attr.ino;
        self.next_ino += 1;
        self.next_generation += 1;
        self.inodes.insert(ino, Inode { attr, xattrs: BTreeMap::new(), body });
        self.usage.inodes += 1;
        ino
    }

    /// The attributes of the next inode created.
    fn new_attr(&self, kind: FileKind, perm: u32, rdev: u32, by: Creator) -> Attr {
        Attr {
            ino: self.next_ino,
            kind,
            perm: perm & 0o7777,
            uid: by.uid,
            gid: by.gid,
            size: 0,
            nlink: 1,
            atime: by.now,
            mtime: by.now,
            ctime: by.now,
            btime: by.now,
            rdev,
            generation: self.next_generation,
        }
    }

    /// What a new inode of `kind` in directory `parent` takes from it: its
    /// permission bits and its creator's group, given the caller's.
    fn inherit(&self, parent: Ino, kind: FileKind, perm: u32, mut by: Creator) -> (u32, Creator) {
        let mut perm = perm & 0o7777;
        let dir = &self.inodes[&parent].attr;
        if dir.perm & libc::S_ISGID != 0 {
            // BSD group semantics below a set-group-id directory: the new
            // inode takes the directory's group, a new directory its flag.
            by.gid = dir.gid;
            if kind == FileKind::Dir {
                perm |= libc::S_ISGID;
            }
        }
        (perm, by)
    }

    /// The attributes `Cmd::Mknod` of a regular file would give the inode
    /// it creates if it applied now, and the cookie of its entry; an error
    /// if it would fail. None for a directory whose new files take a
    /// reduce policy (their inodes are more than attributes).
    pub fn plan_file(&self, parent: Ino, name: &[u8], perm: u32, by: Creator) -> Result<Option<(Attr, u64)>, Errno> {
        self.free_name(parent, name)?;
        let dir = &self.inodes[&parent];
        let Body::Dir { next_cookie, .. } = dir.body else { unreachable!("free_name checked it") };
        if dir.xattrs.contains_key(POLICY_XATTR) {
            return Ok(None);
        }
        let (perm, by) = self.inherit(parent, FileKind::File, perm, by);
        Ok(Some((self.new_attr(FileKind::File, perm, 0, by), next_cookie)))
    }

    /// The directory `ino`, or ENOENT / ENOTDIR.
    fn dir(&self, ino: Ino) -> Result<&Inode, Errno> {
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        match inode.body {
            Body::Dir { .. } => Ok(inode),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn lookup_ino(&self, parent: Ino, name: &[u8]) -> Result<Ino, Errno> {
        let Body::Dir { parent: up, entries, .. } = &self.dir(parent)?.body else { unreachable!() };
        match name {
            b"." => Ok(parent),
            b".." => Ok(*up),
            _ => {
                check_name(name)?;
                entries.get(name).map(|&(_, ino)| ino).ok_or(Errno::ENOENT)
            }
        }
    }

    /// The entry `name` of `parent` that a new entry would take: the
    /// directory must exist and the name be a valid new name.
    fn free_name(&self, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        let Body::Dir { entries, .. } = &self.dir(parent)?.body else { unreachable!() };
        if self.inodes[&parent].attr.nlink == 0 {
            // A removed directory takes no new entries.
            return Err(Errno::ENOENT);
        }
        if name == b"." || name == b".." {
            return Err(Errno::EEXIST);
        }
        check_name(name)?;
        if entries.contains_key(name) { Err(Errno::EEXIST) } else { Ok(()) }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        rdev: u32,
        by: Creator,
        body: Body,
    ) -> Result<Reply, Errno> {
        self.free_name(parent, name)?;
        let (perm, by) = self.inherit(parent, kind, perm, by);
        if kind == FileKind::Dir && self.inodes[&parent].attr.nlink >= LINK_MAX {
            return Err(Errno::EMLINK);
        }
        let policy = self.inodes[&parent].xattrs.get(POLICY_XATTR).cloned();
        let body = match body {
            Body::File { .. } if policy.is_some() => Body::Reduced { views: BTreeMap::new() },
            b => b,
        };
        let ino = self.new_inode(kind, perm, rdev, by, body);
        if let Some(p) = policy.filter(|_| matches!(kind, FileKind::File | FileKind::Dir)) {
            self.inode_mut(ino).xattrs.insert(POLICY_XATTR.to_vec(), p);
        }
        if kind == FileKind::Dir {
            self.inode_mut(ino).attr.nlink = 2;
            self.inode_mut(parent).attr.nlink += 1;
        }
        if let Body::Symlink { target } = &self.inodes[&ino].body {
            let len = target.len() as u64;
            self.inode_mut(ino).attr.size = len;
        }
        self.add_entry(parent, name, ino, by.now);
        Ok(Reply::Entry(self.inodes[&ino].attr.clone()))
    }

    /// Adds a checked-free entry and updates the directory's times.
    fn add_entry(&mut self, parent: Ino, name: &[u8], ino: Ino, now: Time) {
        let dir = self.inode_mut(parent);
        let Body::Dir { entries, by_cookie, next_cookie, .. } = &mut dir.body else { unreachable!() };
        let cookie = *next_cookie;
        *next_cookie += 1;
        entries.insert(name.to_vec(), (cookie, ino));
        by_cookie.insert(cookie, name.to_vec());
        dir.attr.mtime = now;
        dir.attr.ctime = now;
    }

    /// Removes an existing entry and updates the directory's times; returns
    /// the inode it named.
    fn remove_entry(&mut self, parent: Ino, name: &[u8], now: Time) -> Ino {
        let dir = self.inode_mut(parent);
        let Body::Dir { entries, by_cookie, .. } = &mut dir.body else { unreachable!() };
        let (cookie, ino) = entries.remove(name).expect("a checked entry exists");
        by_cookie.remove(&cookie);
        dir.attr.mtime = now;
        dir.attr.ctime = now;
        ino
    }

    /// Drops one link of `ino` (a directory: its `.` too); an inode left
    /// without links becomes an orphan.
    fn drop_link(&mut self, ino: Ino, now: Time, orphaned: &mut Vec<Ino>) {
        let attr = &mut self.inode_mut(ino).attr;
        attr.ctime = now;
        attr.nlink = if attr.kind == FileKind::Dir { 0 } else { attr.nlink - 1 };
        if attr.nlink == 0 {
            self.orphans.insert(ino);
            orphaned.push(ino);
        }
    }

    fn link(&mut self, ino: Ino, parent: Ino, name: &[u8], now: Time) -> Result<Reply, Errno> {
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        if inode.attr.kind == FileKind::Dir {
            return Err(Errno::EPERM);
        }
        if inode.attr.nlink == 0 {
            // linkat(2) of an unlinked open file without O_TMPFILE.
            return Err(Errno::ENOENT);
        }
        if inode.attr.nlink >= LINK_MAX {
            return Err(Errno::EMLINK);
        }
        self.free_name(parent, name)?;
        self.add_entry(parent, name, ino, now);
        let attr = &mut self.inode_mut(ino).attr;
        attr.nlink += 1;
        attr.ctime = now;
        Ok(Reply::Entry(attr.clone()))
    }

    fn remove(&mut self, parent: Ino, name: &[u8], dir: bool, now: Time) -> Result<Reply, Errno> {
        match name {
            b"." => return Err(if dir { Errno::EINVAL } else { Errno::EISDIR }),
            b".." => return Err(if dir { Errno::ENOTEMPTY } else { Errno::EISDIR }),
            _ => {}
        }
        let ino = self.lookup_ino(parent, name)?;
        let target = &self.inodes[&ino];
        match (&target.body, dir) {
            (Body::Dir { entries, .. }, true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Body::Dir { .. }, true) => {}
            (Body::Dir { .. }, false) => return Err(Errno::EISDIR),
            (_, true) => return Err(Errno::ENOTDIR),
            (_, false) => {}
        }
        self.remove_entry(parent, name, now);
        if dir {
            self.inode_mut(parent).attr.nlink -= 1;
        }
        let mut orphaned = Vec::new();
        self.drop_link(ino, now, &mut orphaned);
        Ok(Reply::Removed { orphaned })
    }

    /// Whether `ino` is `ancestor` or lies below it.
    fn is_within(&self, mut ino: Ino, ancestor: Ino) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match &self.inodes[&ino].body {
                Body::Dir { parent, .. } if *parent != ino => ino = *parent,
                _ => return false,
            }
        }
    }

    fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
        now: Time,
    ) -> Result<Reply, Errno> {
        for n in [name, new_name] {
            if n == b"." || n == b".." {
                return Err(if mode == RenameMode::Exchange { Errno::EINVAL } else { Errno::EBUSY });
            }
        }
        let src = self.lookup_ino(parent, name)?;
        self.dir(new_parent)?;
        check_name(new_name)?;
        let dst = match self.lookup_ino(new_parent, new_name) {
            Ok(ino) => Some(ino),
            Err(e) if e == Errno::ENOENT => None,
            Err(e) => return Err(e),
        };
        if self.inodes[&new_parent].attr.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        let src_dir = self.inodes[&src].attr.kind == FileKind::Dir;
        let dst_dir = dst.is_some_and(|d| self.inodes[&d].attr.kind == FileKind::Dir);
        match mode {
            RenameMode::NoReplace if dst.is_some() => return Err(Errno::EEXIST),
            RenameMode::Exchange if dst.is_none() => return Err(Errno::ENOENT),
            _ => {}
        }
        // A directory may not move below itself; in an exchange neither may.
        if src_dir && self.is_within(new_parent, src) {
            return Err(Errno::EINVAL);
        }
        if mode == RenameMode::Exchange {
            let dst = dst.expect("checked");
            if dst_dir && self.is_within(parent, dst) {
                return Err(Errno::EINVAL);
            }
            if src == dst {
                return Ok(Reply::Removed { orphaned: Vec::new() });
            }
            return Ok(self.exchange(parent, name, src, new_parent, new_name, dst, now));
        }
        if let Some(dst) = dst {
            if dst == src {
                // Two names of one inode: POSIX says do nothing.
                return Ok(Reply::Removed { orphaned: Vec::new() });
            }
            match (src_dir, dst_dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) => {
                    if let Body::Dir { entries, .. } = &self.inodes[&dst].body
                        && !entries.is_empty()
                    {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
                (false, false) => {}
            }
        }
        if src_dir && parent != new_parent && dst.is_none() && self.inodes[&new_parent].attr.nlink >= LINK_MAX {
            return Err(Errno::EMLINK);
        }
        // Checks done: from here on nothing fails.
        let mut orphaned = Vec::new();
        if let Some(dst) = dst {
            self.remove_entry(new_parent, new_name, now);
            if dst_dir {
                self.inode_mut(new_parent).attr.nlink -= 1;
            }
            self.drop_link(dst, now, &mut orphaned);
        }
        self.remove_entry(parent, name, now);
        self.add_entry(new_parent, new_name, src, now);
        if src_dir && parent != new_parent {
            self.inode_mut(parent).attr.nlink -= 1;
            self.inode_mut(new_parent).attr.nlink += 1;
            self.set_dotdot(src, new_parent);
        }
        self.inode_mut(src).attr.ctime = now;
        Ok(Reply::Removed { orphaned })
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &mut self,
        parent: Ino,
        name: &[u8],
        src: Ino,
        new_parent: Ino,
        new_name: &[u8],
        dst: Ino,
        now: Time,
    ) -> Reply {
        self.set_entry(parent, name, dst, now);
        self.set_entry(new_parent, new_name, src, now);
        if parent != new_parent {
            let src_dir = self.inodes[&src].attr.kind == FileKind::Dir;
            let dst_dir = self.inodes[&dst].attr.kind == FileKind::Dir;
            if src_dir {
                self.set_dotdot(src, new_parent);
            }
            if dst_dir {
                self.set_dotdot(dst, parent);
            }
            // Subdirectory counts move with the directories.
            let delta = i64::from(src_dir) - i64::from(dst_dir);
            let adjust = |n: u32, d: i64| (i64::from(n) + d) as u32;
            let a = &mut self.inode_mut(parent).attr;
            a.nlink = adjust(a.nlink, -delta);
            let b = &mut self.inode_mut(new_parent).attr;
            b.nlink = adjust(b.nlink, delta);
        }
        self.inode_mut(src).attr.ctime = now;
        self.inode_mut(dst).attr.ctime = now;
        Reply::Removed { orphaned: Vec::new() }
    }

    /// Points an existing entry at another inode (keeping its cookie).
    fn set_entry(&mut self, parent: Ino, name: &[u8], ino: Ino, now: Time) {
        let dir = self.inode_mut(parent);
        let Body::Dir { entries, .. } = &mut dir.body else { unreachable!() };
        entries.get_mut(name).expect("a checked entry exists").1 = ino;
        dir.attr.mtime = now;
        dir.attr.ctime = now;
    }

    fn set_dotdot(&mut self, dir: Ino, new_parent: Ino) {
        if let Body::Dir { parent, .. } = &mut self.inode_mut(dir).body {
            *parent = new_parent;
        }
    }

    fn setattr(&mut self, ino: Ino, set: &SetAttr, now: Time) -> Result<Reply, Errno> {
        let (chunk_size, up) = (self.chunk_size, self.unit_pages());
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let mut freed = Vec::new();
        if set.tail.is_some() && set.size.is_none() {
            return Err(Errno::EINVAL);
        }
        if let (Some(size), Body::Reduced { views }) = (set.size, &mut inode.body) {
            if size > FILE_SIZE_MAX {
                return Err(Errno::EFBIG);
            }
            if set.tail.is_some() {
                return Err(Errno::EINVAL);
            }
            // Views past the new end go, the one across it is cut: nothing
            // is rewritten, and bytes past the end are never read.
            let dropped = self.reduce.unmap(views, size, u64::MAX);
            freed = self.reduce.release(dropped);
            self.usage.data_pages -= pages(&freed);
            if size != inode.attr.size && set.mtime.is_none() {
                inode.attr.mtime = now;
            }
            inode.attr.size = size;
        } else if let Some(size) = set.size {
            let Body::File { chunks } = &mut inode.body else {
                return Err(if inode.attr.kind == FileKind::Dir { Errno::EISDIR } else { Errno::EINVAL });
            };
            if size > FILE_SIZE_MAX {
                return Err(Errno::EFBIG);
            }
            if set.tail.is_some_and(|(index, c)| size == 0 || index != (size - 1) / chunk_size || c.pages == 0) {
                return Err(Errno::EINVAL);
            }
            if size < inode.attr.size {
                // Pages wholly past the new end go; the one holding it stays
                // (the data path zeroes its tail before proposing this).
                freed = unmap(chunks, up, size.div_ceil(PAGE), u64::MAX);
            }
            if let Some((index, chunk)) = set.tail {
                freed.extend(map(chunks, up, index, chunk));
            }
            self.usage.data_pages -= pages(&freed);
            self.usage.data_pages += set.tail.map_or(0, |(_, c)| u64::from(c.pages));
            if size != inode.attr.size && set.mtime.is_none() {
                inode.attr.mtime = now;
            }
            inode.attr.size = size;
        }
        let a = &mut inode.attr;
        if let Some(perm) = set.perm {
            a.perm = perm & 0o7777;
        }
        if let Some(uid) = set.uid {
            a.uid = uid;
        }
        if let Some(gid) = set.gid {
            a.gid = gid;
        }
        if let Some(t) = set.atime {
            a.atime = t;
        }
        if let Some(t) = set.mtime {
            a.mtime = t;
        }
        if let Some(t) = set.btime {
            a.btime = t;
        }
        a.ctime = now;
        Ok(Reply::Attr(a.clone(), freed))
    }

    fn setxattr(&mut self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode, now: Time) -> Result<Reply, Errno> {
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(Errno::E2BIG);
        }
        let exists = inode.xattrs.contains_key(name);
        match mode {
            XattrMode::Create if exists => return Err(Errno::EEXIST),
            XattrMode::Replace if !exists => return Err(Errno::ENODATA),
            _ => {}
        }
        let mut value = value.to_vec();
        if name == POLICY_XATTR {
            let policy: ReducePolicy = super::reduced::parse_policy(&value).ok_or(Errno::EINVAL)?;
            value = policy.to_string().into_bytes();
            if inode.xattrs.get(name) != Some(&value) {
                set_layout(inode, true)?;
            }
        }
        inode.xattrs.insert(name.to_vec(), value);
        inode.attr.ctime = now;
        Ok(Reply::Done)
    }

    fn write(&mut self, ino: Ino, chunks: &[(u64, ChunkRef)], end: u64, now: Time) -> Result<Reply, Errno> {
        if end > FILE_SIZE_MAX {
            return Err(Errno::EFBIG);
        }
        self.remap(ino, &[], chunks, end, now)
    }

    /// Unmaps the unit ranges `holes`, maps `chunks`, grows the size to at
    /// least `end`; replies with what was unmapped or replaced.
    fn remap(
        &mut self,
        ino: Ino,
        holes: &[(u64, u64)],
        chunks: &[(u64, ChunkRef)],
        end: u64,
        now: Time,
    ) -> Result<Reply, Errno> {
        let up = self.unit_pages();
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let Body::File { chunks: extents } = &mut inode.body else {
            return Err(if inode.attr.kind == FileKind::Dir { Errno::EISDIR } else { Errno::EINVAL });
        };
        let past_max = |unit: u64, pages: u64| {
            unit.checked_mul(up * PAGE).and_then(|b| b.checked_add(pages * PAGE)).is_none_or(|e| e > FILE_SIZE_MAX)
        };
        if chunks.iter().any(|&(k, c)| c.pages == 0 || past_max(k, u64::from(c.pages)))
            || holes.iter().any(|&(a, b)| a > b || past_max(b, 0))
        {
            return Err(Errno::EINVAL);
        }
        let mut freed = Vec::new();
        for &(first, end) in holes {
            freed.extend(unmap(extents, up, first * up, end * up));
        }
        for &(unit, chunk) in chunks {
            freed.extend(map(extents, up, unit, chunk));
        }
        self.usage.data_pages += pages(chunks.iter().map(|(_, c)| c));
        self.usage.data_pages -= pages(&freed);
        let a = &mut inode.attr;
        a.size = a.size.max(end);
        a.mtime = now;
        a.ctime = now;
        Ok(Reply::Attr(a.clone(), freed))
    }
}

/// Maps `chunk` at unit `unit` of a file map of `up` pages per unit,
/// replacing the whole units it reaches into; returns what it replaced.
fn map(extents: &mut BTreeMap<u64, ChunkRef>, up: u64, unit: u64, chunk: ChunkRef) -> Vec<ChunkRef> {
    let first = unit * up;
    let freed = unmap(extents, up, first, (first + u64::from(chunk.pages)).next_multiple_of(up));
    extents.insert(unit, chunk);
    freed
}

/// Takes pages `[from, to)` out of a file map of `up` pages per unit (`to`
/// a whole unit, or `u64::MAX`); extents reaching into the range are cut
/// and keep what lies outside it. Returns the runs let go of.
fn unmap(extents: &mut BTreeMap<u64, ChunkRef>, up: u64, from: u64, to: u64) -> Vec<ChunkRef> {
    debug_assert!(to == u64::MAX || to % up == 0, "pages up to {to} are not whole units of {up}");
    let first = extents.range(..from / up + 1).next_back().map_or(from / up, |(&k, _)| k);
    let hit: Vec<u64> = extents.range(first..).map(|(&k, _)| k).take_while(|&k| k * up < to).collect();
    let mut freed = Vec::new();
    for k in hit {
        let c = extents[&k];
        let (start, end) = (k * up, k * up + u64::from(c.pages));
        if end <= from {
            continue;
        }
        extents.remove(&k);
        if start < from {
            extents.insert(k, c.sub(0, from - start));
        }
        if end > to {
            extents.insert(to / up, c.sub(to - start, end - to));
        }
        let (a, b) = (from.max(start), to.min(end));
        freed.push(c.sub(a - start, b - a));
    }
    freed
}

fn pages<'a>(runs: impl IntoIterator<Item = &'a ChunkRef>) -> u64 {
    runs.into_iter().map(|c| u64::from(c.pages)).sum()
}

impl Body {
    fn dir(parent: Ino) -> Body {
        Body::Dir { parent, entries: BTreeMap::new(), by_cookie: BTreeMap::new(), next_cookie: FIRST_COOKIE }
    }
}

/// The policy an inode's xattr names.
fn policy_of(inode: &Inode) -> Option<ReducePolicy> {
    super::reduced::parse_policy(inode.xattrs.get(POLICY_XATTR)?)
}

/// Makes a regular file reduced or plain as its policy xattr is set or
/// removed: only while it holds no data (EBUSY otherwise; a file's layout
/// is chosen when it is created, by its directory's policy). Directories
/// only pass the policy on; other kinds take none (EINVAL).
fn set_layout(inode: &mut Inode, reduced: bool) -> Result<(), Errno> {
    match &inode.body {
        Body::Dir { .. } => Ok(()),
        Body::File { chunks } if chunks.is_empty() && inode.attr.size == 0 => {
            if reduced {
                inode.body = Body::Reduced { views: BTreeMap::new() };
            }
            Ok(())
        }
        Body::Reduced { views } if views.is_empty() && inode.attr.size == 0 => {
            if !reduced {
                inode.body = Body::File { chunks: BTreeMap::new() };
            }
            Ok(())
        }
        Body::File { .. } | Body::Reduced { .. } => Err(Errno::EBUSY),
        _ => Err(Errno::EINVAL),
    }
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// A directory entry's name: 1 to 255 bytes, no `/` and no NUL.
fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// The xattr holding a file's capabilities.
const CAPS_XATTR: &[u8] = b"security.capability";

/// The permission bits `drop` takes from an inode with attributes `a`:
/// none for [`DropPrivs::Caps`] or a directory; else the set-user-ID bit,
/// and the set-group-ID bit if the group may execute.
fn dropped_set_ids(a: &Attr, drop: DropPrivs) -> u32 {
    if drop != DropPrivs::All || a.kind == FileKind::Dir {
        return 0;
    }
    let sgid = if a.perm & libc::S_IXGRP != 0 { libc::S_ISGID } else { 0 };
    a.perm & (libc::S_ISUID | sgid)
}

/// An extended attribute's name: in a namespace we keep, at most 255 bytes.
fn check_xattr_name(name: &[u8]) -> Result<(), Errno> {
    if name.len() > XATTR_NAME_MAX {
        return Err(Errno::ERANGE);
    }
    const KEPT: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];
    const ACLS: [&[u8]; 2] = [b"system.posix_acl_access", b"system.posix_acl_default"];
    let kept = KEPT.iter().any(|ns| name.len() > ns.len() && name.starts_with(ns))
        || ACLS.contains(&name)
        || name == POLICY_XATTR;
    if kept { Ok(()) } else { Err(Errno::EOPNOTSUPP) }
}
