//! Unlinks and creates answered ahead of their apply, and the view of the
//! state that counts them in.
//!
//! An unlink or a create of a regular file that cannot fail is answered as
//! soon as it is proposed: its client does not wait for the metadata
//! thread to take it through the log and the state machine (two wake-ups
//! across cores, most of such a request's time on a FUSE mount). "Cannot
//! fail" is checked against the state as readers see it ([`View`]: the
//! applied state with the commands still ahead) while no other command
//! that adds or removes names is in flight, and the proposal enters the
//! group's queue before that check lets go, so every command proposed later
//! applies after it.
//!
//! Until it applies, readers see it through the [`View`]: an unlinked name
//! is gone from lookups and listings, its inode's link count and change
//! time are what they will be; a created file is in lookups and listings
//! (with the cookie its entry will have) and has the attributes the apply
//! will give it, down to its inode number: the state numbers inodes in
//! order, and nothing but the creates ahead can take a number before it.
//! Directories' times are what they will be. The state machine drops a
//! command from the overlay in the same write of the state that applies
//! it, so a reader sees it exactly once.
//!
//! The view answers attributes, lookups and listings. Anything else about
//! a file created ahead (its data, xattrs) waits for its apply
//! ([`Ahead::wait_created`]), which is microseconds away.
//!
//! Durability is as for any command: the log record lingers either way,
//! and [`super::MetaRaft::sync`] waits for what was answered ahead before
//! it, and for what its callers do once it applies (freeing what unlinks
//! let go of). A command answered ahead that fails all the same (the group
//! stopped under it) is logged and reported to the next `sync`.

use std::collections::{BTreeSet, VecDeque};
use std::ops::Deref;
use std::sync::{Condvar, Mutex, MutexGuard};

use futures_util::future::BoxFuture;

use crate::fs::{Attr, Cmd, DirEntry, Errno, FileKind, Ino, MetaState, Reply, Time};

use super::CmdResult;

/// Commands answered ahead and not yet applied, at most: beyond this the
/// next one waits for its apply, which bounds what readers scan.
pub const MAX_AHEAD: usize = 64;

/// What runs on the group's thread once a command answered ahead has
/// applied, given its result.
pub(crate) type Then = Box<dyn FnOnce(CmdResult) -> BoxFuture<'static, Result<(), Errno>> + Send>;

/// A command answered ahead, waiting in the book's outbox to be proposed.
pub(crate) struct Deferred {
    pub(crate) seq: u64,
    pub(crate) cmd: Cmd,
    pub(crate) then: Then,
}

/// The shared book of commands answered ahead.
pub(crate) struct Ahead {
    inner: Mutex<Book>,
    /// Wakes the task that proposes what waits in the outbox.
    pub(crate) kick: tokio::sync::Notify,
    /// Signalled each time a create answered ahead leaves the book.
    created: Condvar,
    /// Changed each time a command answered ahead is settled.
    settled: tokio::sync::watch::Sender<()>,
}

#[derive(Default)]
pub(crate) struct Book {
    /// Commands that add or remove names (create, mknod, mkdir, symlink,
    /// link, unlink, rmdir, rename), proposed the usual way and not yet
    /// applied: while any is, nothing is answered ahead (its check could
    /// not see what they will do, nor which inode numbers they take).
    naming: u32,
    /// Unlinks answered and not yet applied, in the order proposed.
    unlinks: VecDeque<Unlink>,
    /// Creates answered and not yet applied, in the order proposed.
    creates: VecDeque<Create>,
    /// Sequence number of the last command answered ahead.
    proposed: u64,
    /// Commands answered ahead whose apply, and what follows it, is not
    /// done yet.
    unsettled: BTreeSet<u64>,
    /// Commands answered ahead and not yet proposed, in order: they go to
    /// the group in batches, ahead of any other proposal.
    pub(crate) outbox: Vec<Deferred>,
    /// A command answered ahead, or what followed it, failed: the next
    /// sync reports it.
    failed: bool,
}

/// An unlink answered ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unlink {
    seq: u64,
    parent: Ino,
    name: Vec<u8>,
    /// The inode the name named.
    ino: Ino,
    now: Time,
}

/// A create of a regular file answered ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Create {
    seq: u64,
    parent: Ino,
    name: Vec<u8>,
    /// What the apply will make: the client has been told so.
    attr: Attr,
    /// The cookie of its entry.
    cookie: u64,
}

impl Ahead {
    pub(crate) fn new() -> Ahead {
        Ahead {
            inner: Mutex::default(),
            kick: tokio::sync::Notify::new(),
            created: Condvar::new(),
            settled: tokio::sync::watch::Sender::new(()),
        }
    }

    pub(crate) fn book(&self) -> MutexGuard<'_, Book> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A command that can add or remove a name is proposed the usual way
    /// (`book.naming` was counted up for it, with the book locked, before
    /// it was): nothing is answered ahead until the guard (held until it
    /// has applied) is dropped.
    pub(crate) fn naming(&self) -> Naming<'_> {
        Naming(self)
    }

    /// The state machine applied `cmd` with result `r`, under the write
    /// lock of the state: if it was answered ahead, it leaves the overlay.
    pub(crate) fn applied(&self, cmd: &Cmd, r: &CmdResult) {
        match cmd {
            Cmd::Unlink { parent, name, .. } => {
                let mut book = self.book();
                let Some(at) = book.unlinks.iter().position(|u| u.parent == *parent && u.name == *name) else {
                    return;
                };
                book.unlinks.remove(at);
                if r.is_err() {
                    tracing::error!(
                        "an unlink answered ahead failed when it applied: {:?} in directory {parent}: {r:?}",
                        String::from_utf8_lossy(name)
                    );
                }
            }
            Cmd::Mknod { parent, name, .. } => {
                let mut book = self.book();
                let Some(at) = book.creates.iter().position(|c| c.parent == *parent && c.name == *name) else {
                    return;
                };
                let told = book.creates.remove(at).expect("found").attr;
                if !matches!(r, Ok(Reply::Entry(a)) if *a == told) {
                    // The client was told of another inode: its next sync fails.
                    book.failed = true;
                    tracing::error!(
                        "a create answered ahead as inode {} applied otherwise: {:?} in directory {parent}: {r:?}",
                        told.ino,
                        String::from_utf8_lossy(name)
                    );
                }
                self.created.notify_all();
            }
            _ => {}
        }
    }

    /// Command `seq` answered ahead has applied and what follows it is done
    /// (`ok`: all of it succeeded), or it can no longer apply.
    pub(crate) fn settled(&self, seq: u64, ok: bool) {
        {
            let mut book = self.book();
            book.unsettled.remove(&seq);
            // Still here if the group stopped before it applied.
            book.unlinks.retain(|u| u.seq != seq);
            book.creates.retain(|c| c.seq != seq);
            book.failed |= !ok;
        }
        self.created.notify_all();
        self.settled.send_replace(());
    }

    /// Waits until every command answered ahead so far is settled; an
    /// error if one of them failed since the last call.
    pub(crate) async fn settle(&self) -> Result<(), Errno> {
        let want = self.book().proposed;
        let mut settled = self.settled.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = settled.wait_for(|_| self.book().unsettled.first().is_none_or(|&s| s > want)).await;
        if std::mem::take(&mut self.book().failed) { Err(Errno::EIO) } else { Ok(()) }
    }

    /// Blocks until inode `ino` is not a create ahead of its apply: then
    /// the state itself has it (or it failed). Returns at once for any
    /// other inode. `propose` proposes what waits in the outbox first.
    pub(crate) fn wait_created(&self, ino: Ino, propose: impl FnOnce(&mut Book)) {
        let mut book = self.book();
        if book.creates.iter().any(|c| c.attr.ino == ino) {
            propose(&mut book);
        }
        while book.creates.iter().any(|c| c.attr.ino == ino) {
            book = self.created.wait(book).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Book {
    /// The state `state` as readers see it, with these commands ahead.
    pub(crate) fn view<'a>(&'a self, state: &'a MetaState) -> View<'a> {
        View { state, book: self }
    }

    /// Counts a command that adds or removes names, about to be proposed
    /// the usual way ([`Ahead::naming`] gives it back).
    pub(crate) fn count_naming(&mut self) {
        self.naming += 1;
    }

    /// Whether nothing more may be answered ahead for now.
    fn closed(&self) -> bool {
        self.naming > 0 || self.unlinks.len() + self.creates.len() >= MAX_AHEAD
    }

    /// Whether a command ahead names `name` in `parent`.
    fn names(&self, parent: Ino, name: &[u8]) -> bool {
        self.hides(parent, name) || self.creates.iter().any(|c| c.parent == parent && c.name == name)
    }

    /// Whether an unlink ahead removes `name` from `parent`.
    fn hides(&self, parent: Ino, name: &[u8]) -> bool {
        self.unlinks.iter().any(|u| u.parent == parent && u.name == name)
    }

    /// Whether `Unlink { parent, name }` is sure to succeed when it
    /// applies after everything proposed so far: the inode it would
    /// remove, if so.
    pub(crate) fn can_unlink(&self, state: &MetaState, parent: Ino, name: &[u8]) -> Option<Ino> {
        if self.closed() || self.names(parent, name) {
            return None;
        }
        // `.` and `..` are directories: refused here, and by the state.
        self.view(state).lookup(parent, name).ok().filter(|a| a.kind != FileKind::Dir).map(|a| a.ino)
    }

    /// Whether `Mknod` of a regular file `name` in `parent` (`perm`, by
    /// `by`) is sure to succeed when it applies after everything proposed
    /// so far: the attributes it will give the file and the cookie of its
    /// entry, if so.
    pub(crate) fn can_create(
        &self,
        state: &MetaState,
        parent: Ino,
        name: &[u8],
        perm: u32,
        by: crate::fs::Creator,
    ) -> Option<(Attr, u64)> {
        if self.closed() || self.names(parent, name) {
            return None;
        }
        let (mut attr, cookie) = state.plan_file(parent, name, perm, by).ok()??;
        // Each create ahead takes the next inode number, generation and
        // cookie of its directory before this one.
        let before = self.creates.len() as u64;
        attr.ino += before;
        attr.generation += before;
        let cookie = cookie + self.creates.iter().filter(|c| c.parent == parent).count() as u64;
        Some((attr, cookie))
    }

    /// Records an unlink answered ahead (once it is proposed); returns
    /// its sequence number.
    pub(crate) fn answered(&mut self, parent: Ino, name: Vec<u8>, ino: Ino, now: Time) -> u64 {
        let seq = self.next();
        self.unlinks.push_back(Unlink { seq, parent, name, ino, now });
        seq
    }

    /// Records a create answered ahead (once it is proposed), as
    /// [`Book::can_create`] planned it; returns its sequence number.
    pub(crate) fn created(&mut self, parent: Ino, name: Vec<u8>, attr: Attr, cookie: u64) -> u64 {
        let seq = self.next();
        self.creates.push_back(Create { seq, parent, name, attr, cookie });
        seq
    }

    fn next(&mut self) -> u64 {
        self.proposed += 1;
        self.unsettled.insert(self.proposed);
        self.proposed
    }
}

/// Drops the count of a proposed command that can add or remove a name.
pub(crate) struct Naming<'a>(&'a Ahead);

impl Drop for Naming<'_> {
    fn drop(&mut self) {
        self.0.book().naming -= 1;
    }
}

/// The metadata as readers see it: the applied state, with the unlinks
/// and creates answered ahead of their apply. It reads as [`MetaState`]
/// does; what those commands change is answered here (attributes, lookups,
/// listings). Other questions about a file created ahead must wait for it
/// ([`super::MetaRaft::wait_created`]).
pub struct View<'a> {
    state: &'a MetaState,
    book: &'a Book,
}

impl Deref for View<'_> {
    type Target = MetaState;

    fn deref(&self) -> &MetaState {
        self.state
    }
}

impl View<'_> {
    /// The applied state alone.
    pub fn applied(&self) -> &MetaState {
        self.state
    }

    /// An inode's attributes.
    pub fn getattr(&self, ino: Ino) -> Result<Attr, Errno> {
        let mut attr = match self.book.creates.iter().find(|c| c.attr.ino == ino) {
            Some(c) => c.attr.clone(),
            None => self.state.getattr(ino)?.clone(),
        };
        let times = |attr: &mut Attr, now: Time| {
            attr.mtime = attr.mtime.max(now);
            attr.ctime = attr.ctime.max(now);
        };
        for c in self.book.creates.iter().filter(|c| c.parent == ino) {
            times(&mut attr, c.attr.ctime);
        }
        for u in self.book.unlinks.iter() {
            if u.parent == ino {
                times(&mut attr, u.now);
            }
            if u.ino == ino {
                attr.nlink = attr.nlink.saturating_sub(1);
                attr.ctime = attr.ctime.max(u.now);
            }
        }
        Ok(attr)
    }

    /// The inode `name` names in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, Errno> {
        if let Some(c) = self.book.creates.iter().find(|c| c.parent == parent && c.name == name) {
            return self.getattr(c.attr.ino);
        }
        let ino = self.state.lookup(parent, name)?.ino;
        if self.book.hides(parent, name) {
            return Err(Errno::ENOENT);
        }
        self.getattr(ino)
    }

    /// Entries of a directory after cookie `offset`, at most `max` (see
    /// [`MetaState::readdir`]).
    pub fn readdir(&self, dir: Ino, offset: u64, max: usize) -> Result<Vec<DirEntry>, Errno> {
        let hidden = self.book.unlinks.iter().filter(|u| u.parent == dir).count();
        let want = max.saturating_add(hidden);
        let mut entries = self.state.readdir(dir, offset, want)?;
        // Entries created ahead follow every applied one.
        let ended = entries.len() < want;
        if hidden > 0 {
            entries.retain(|e| !self.book.hides(dir, &e.name));
        }
        if ended {
            let created = self.book.creates.iter().filter(|c| c.parent == dir && c.cookie > offset);
            entries.extend(created.map(|c| DirEntry {
                cookie: c.cookie,
                name: c.name.clone(),
                ino: c.attr.ino,
                kind: FileKind::File,
            }));
        }
        entries.truncate(max);
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Creator, ROOT};

    const BY: Creator = Creator { uid: 0, gid: 0, now: Time(10) };

    fn apply(s: &mut MetaState, cmd: Cmd) -> Reply {
        s.apply(&cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    fn ino_of(r: Reply) -> Ino {
        match r {
            Reply::Entry(a) => a.ino,
            r => panic!("not an entry: {r:?}"),
        }
    }

    /// A root with a directory `d` of files `f0`..`f9` (`f3` also linked
    /// as `/h`) and an empty directory `e`.
    fn tree() -> (MetaState, Ino) {
        let mut s = MetaState::new(4096, 0, 0, Time(1));
        let d = ino_of(apply(&mut s, Cmd::Mkdir { parent: ROOT, name: b"d".to_vec(), perm: 0o755, by: BY }));
        apply(&mut s, Cmd::Mkdir { parent: ROOT, name: b"e".to_vec(), perm: 0o755, by: BY });
        for i in 0..10 {
            let name = format!("f{i}").into_bytes();
            let cmd = Cmd::Mknod { parent: d, name, kind: FileKind::File, perm: 0o644, rdev: 0, by: BY };
            let ino = ino_of(apply(&mut s, cmd));
            if i == 3 {
                apply(&mut s, Cmd::Link { ino, parent: ROOT, name: b"h".to_vec(), now: Time(11) });
            }
        }
        (s, d)
    }

    fn unlink(parent: Ino, name: &str, now: i64) -> Cmd {
        Cmd::Unlink { parent, name: name.as_bytes().to_vec(), now: Time(now) }
    }

    /// What a reader can ask of one inode: its attributes, its listing
    /// (whole and in pages of 2) and lookups in it, if a directory.
    type Answers = (Result<Attr, Errno>, Vec<Vec<DirEntry>>, Vec<Result<Attr, Errno>>);

    /// Everything a reader can ask of `view`, by inode.
    fn answers(view: &View, inos: &[Ino], dirs: &[Ino]) -> Vec<Answers> {
        let mut out = Vec::new();
        for &ino in inos {
            let mut pages = Vec::new();
            let mut lookups = Vec::new();
            if dirs.contains(&ino) {
                pages.push(view.readdir(ino, 0, usize::MAX).unwrap());
                let mut offset = 0;
                loop {
                    let page = view.readdir(ino, offset, 2).unwrap();
                    let Some(last) = page.last() else { break };
                    offset = last.cookie;
                    pages.push(page);
                }
                for name in ["f0", "f3", "f9", "h", "missing", ".", ".."] {
                    lookups.push(view.lookup(ino, name.as_bytes()));
                }
            }
            out.push((view.getattr(ino), pages, lookups));
        }
        out
    }

    fn create(parent: Ino, name: &str, now: i64) -> Cmd {
        let by = Creator { uid: 7, gid: 8, now: Time(now) };
        Cmd::Mknod { parent, name: name.as_bytes().to_vec(), kind: FileKind::File, perm: 0o640, rdev: 0, by }
    }

    /// Answers `cmds` ahead in `book` (each must be possible) and applies
    /// them to `after`.
    fn answer_ahead(book: &mut Book, state: &MetaState, after: &mut MetaState, cmds: &[Cmd]) {
        for cmd in cmds {
            match cmd {
                Cmd::Unlink { parent, name, now } => {
                    let ino = book.can_unlink(state, *parent, name).expect("a file that exists");
                    book.answered(*parent, name.clone(), ino, *now);
                }
                Cmd::Mknod { parent, name, perm, by, .. } => {
                    let (attr, cookie) = book.can_create(state, *parent, name, *perm, *by).expect("a free name");
                    book.created(*parent, name.clone(), attr, cookie);
                }
                cmd => unreachable!("{cmd:?} is not answered ahead"),
            }
            apply(after, cmd.clone());
        }
    }

    #[test]
    fn the_view_answers_as_the_state_will_once_the_commands_ahead_apply() {
        let (mut state, d) = tree();
        // A set-group-id directory: files created in it take its group.
        apply(&mut state, Cmd::Mkdir { parent: ROOT, name: b"g".to_vec(), perm: 0o2775, by: BY });
        let g = state.lookup(ROOT, b"g").unwrap().ino;
        let inos: Vec<Ino> = (1..=30).collect();
        let dirs = [ROOT, d, g];
        let ahead = [
            unlink(d, "f0", 50),
            create(d, "n1", 51),
            unlink(d, "f3", 52),
            create(ROOT, "n2", 53),
            create(g, "n3", 54),
            unlink(ROOT, "h", 55),
            create(d, "n4", 56),
            unlink(d, "f7", 57),
            create(d, "n5", 58),
        ];
        let mut book = Book::default();
        let mut after = state.clone();
        answer_ahead(&mut book, &state, &mut after, &ahead);
        let none = Book::default();
        assert_eq!(
            answers(&book.view(&state), &inos, &dirs),
            answers(&none.view(&after), &inos, &dirs),
            "the view with the commands ahead and the state after them disagree"
        );
        // The view shows what it must: the state itself does not have it yet.
        assert!(book.view(&state).lookup(d, b"f3").is_err() && state.lookup(d, b"f3").is_ok());
        assert!(book.view(&state).lookup(d, b"n1").is_ok() && state.lookup(d, b"n1").is_err());
        assert_eq!(book.view(&state).lookup(g, b"n3").unwrap().gid, state.getattr(g).unwrap().gid);
    }

    #[test]
    fn only_what_cannot_fail_is_answered_ahead() {
        let (mut state, d) = tree();
        let mut book = Book::default();
        assert_eq!(book.can_unlink(&state, d, b"missing"), None);
        assert_eq!(book.can_unlink(&state, ROOT, b"e"), None, "a directory");
        assert_eq!(book.can_unlink(&state, d, b"."), None);
        assert_eq!(book.can_unlink(&state, d, b".."), None);
        assert_eq!(book.can_unlink(&state, 999, b"f0"), None, "no such directory");
        let f0 = book.can_unlink(&state, d, b"f0").expect("a file");
        book.answered(d, b"f0".to_vec(), f0, Time(50));
        assert_eq!(book.can_unlink(&state, d, b"f0"), None, "already unlinked ahead");

        let by = Creator { uid: 7, gid: 8, now: Time(60) };
        let can_create = |book: &Book, state: &MetaState, parent, name: &str| {
            book.can_create(state, parent, name.as_bytes(), 0o644, by).map(|(a, _)| a.ino)
        };
        assert_eq!(can_create(&book, &state, d, "f1"), None, "the name is taken");
        assert_eq!(can_create(&book, &state, d, "f0"), None, "the name is unlinked ahead");
        assert_eq!(can_create(&book, &state, d, "."), None);
        assert_eq!(can_create(&book, &state, 999, "x"), None, "no such directory");
        let file = state.lookup(d, b"f1").unwrap().ino;
        assert_eq!(can_create(&book, &state, file, "x"), None, "not a directory");
        assert_eq!(can_create(&book, &state, d, &"x".repeat(256)), None, "the name is too long");
        let (attr, cookie) = book.can_create(&state, d, b"x", 0o644, by).expect("a free name");
        book.created(d, b"x".to_vec(), attr, cookie);
        assert_eq!(can_create(&book, &state, d, "x"), None, "already created ahead");
        assert_eq!(book.can_unlink(&state, d, b"x"), None, "created ahead: its unlink waits");
        let cmd = Cmd::SetXattr {
            ino: ROOT,
            name: crate::fs::state::POLICY_XATTR.to_vec(),
            value: b"cdc,lz4".to_vec(),
            mode: crate::fs::XattrMode::Upsert,
            now: Time(61),
        };
        apply(&mut state, cmd);
        assert_eq!(can_create(&book, &state, ROOT, "y"), None, "new files here take a reduce policy");

        book.naming = 1;
        assert_eq!(book.can_unlink(&state, d, b"f1"), None, "a name is changing the usual way");
        assert_eq!(can_create(&book, &state, d, "y"), None, "a name is changing the usual way");
        book.naming = 0;
        for i in 2..MAX_AHEAD {
            book.answered(d, format!("z{i}").into_bytes(), 100 + i as Ino, Time(50));
        }
        assert_eq!(book.can_unlink(&state, d, b"f1"), None, "{MAX_AHEAD} are ahead");
        assert_eq!(can_create(&book, &state, d, "y"), None, "{MAX_AHEAD} are ahead");
    }

    #[test]
    fn sync_waits_for_everything_answered_before_it_and_hears_of_a_failure_once() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ahead = Ahead::new();
        let seqs: Vec<u64> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, name)| ahead.book().answered(ROOT, name.as_bytes().to_vec(), 10 + i as Ino, Time(5)))
            .collect();
        {
            ahead.book().count_naming();
            let _naming = ahead.naming();
            assert_eq!(ahead.book().naming, 1);
        }
        assert_eq!(ahead.book().naming, 0, "the guard gives the count back");
        ahead.applied(&unlink(ROOT, "zzz", 5), &Err(Errno::ENOENT));
        assert_eq!(ahead.book().unlinks.len(), 3, "an unlink not answered ahead is none of the book's");
        ahead.applied(&unlink(ROOT, "a", 5), &Ok(Reply::Done));
        assert_eq!(ahead.book().unlinks.len(), 2, "`a` applied: out of the overlay");
        // Settled out of order: `c`, then `a` (`b`'s follow-up failed).
        ahead.settled(seqs[2], true);
        ahead.settled(seqs[0], true);
        let waiting = |ahead: &Ahead| {
            rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_millis(50), ahead.settle()).await.is_err()
            })
        };
        assert!(waiting(&ahead), "settle returned with `b` unsettled");
        ahead.settled(seqs[1], false);
        assert_eq!(rt.block_on(ahead.settle()), Err(Errno::EIO), "`b` failed");
        assert!(ahead.book().unlinks.is_empty(), "`b` never applied: it left the overlay as it settled");
        let later = ahead.book().answered(ROOT, b"d".to_vec(), 20, Time(5));
        assert!(waiting(&ahead), "settle returned with `d` unsettled");
        ahead.applied(&unlink(ROOT, "d", 5), &Ok(Reply::Done));
        ahead.settled(later, true);
        assert_eq!(rt.block_on(ahead.settle()), Ok(()), "a failure is reported once");
        assert!(ahead.book().unlinks.is_empty());
    }

    #[test]
    fn a_create_ahead_is_waited_for_and_one_that_applied_otherwise_fails_the_next_sync() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (state, d) = tree();
        let ahead = std::sync::Arc::new(Ahead::new());
        let cmd = create(d, "n", 60);
        let Cmd::Mknod { perm, by, .. } = &cmd else { unreachable!() };
        let (attr, cookie) = ahead.book().can_create(&state, d, b"n", *perm, *by).expect("a free name");
        let seq = ahead.book().created(d, b"n".to_vec(), attr.clone(), cookie);
        let waiter = {
            let (ahead, ino) = (ahead.clone(), attr.ino);
            std::thread::spawn(move || ahead.wait_created(ino, |_| {}))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished(), "the wait returned before the create applied");
        ahead.wait_created(attr.ino + 1, |_| panic!("not created ahead: nothing to propose"));
        // It applies as another inode than the client was told of.
        let other = Attr { ino: attr.ino + 1, ..attr.clone() };
        ahead.applied(&cmd, &Ok(Reply::Entry(other)));
        waiter.join().unwrap();
        assert!(ahead.book().creates.is_empty(), "out of the overlay as it applied");
        ahead.settled(seq, true);
        assert_eq!(rt.block_on(ahead.settle()), Err(Errno::EIO), "the client was told of another inode");
        assert_eq!(rt.block_on(ahead.settle()), Ok(()), "once");
    }
}
