//! Unlinks answered ahead of their apply, and the view of the state that
//! counts them in.
//!
//! An unlink that cannot fail is answered as soon as it is proposed: its
//! client does not wait for the metadata thread to take it through the log
//! and the state machine (two wake-ups across cores, most of an unlink's
//! time on a FUSE mount). "Cannot fail" is checked against the state as
//! readers see it ([`View`]: the applied state less the unlinks still
//! ahead) while nothing else that removes names is in flight, and the
//! proposal enters the group's queue before that check lets go, so every
//! command proposed later applies after it.
//!
//! Until it applies, readers see it through the [`View`]: its name is gone
//! from lookups and listings, its directory's times and its inode's link
//! count and change time are what they will be. The state machine drops
//! it from the overlay in the same write of the state that applies it, so
//! a reader sees it exactly once.
//!
//! Durability is as for any command: the log record lingers either way,
//! and [`super::MetaRaft::sync`] waits for unlinks answered before it, and
//! for what their callers do once they apply (freeing what they let go
//! of). An unlink that fails all the same (the group stopped under it) is
//! logged and reported to the next `sync`.

use std::collections::{BTreeSet, VecDeque};
use std::ops::Deref;
use std::sync::{Mutex, MutexGuard};

use crate::fs::{Attr, DirEntry, Errno, FileKind, Ino, MetaState, Time};

/// Unlinks answered ahead and not yet applied, at most: beyond this the
/// next one waits for its apply, which bounds what readers scan.
pub const MAX_AHEAD: usize = 64;

/// The shared book of unlinks answered ahead.
pub(crate) struct Ahead {
    inner: Mutex<Book>,
    /// Changed each time an unlink answered ahead is settled.
    settled: tokio::sync::watch::Sender<()>,
}

#[derive(Default)]
pub(crate) struct Book {
    /// Commands that can remove a name (unlink, rmdir, rename), proposed
    /// the usual way and not yet applied: while any is, no unlink is
    /// answered ahead (its check could not see what they will do).
    removing: u32,
    /// Unlinks answered and not yet applied, in the order proposed.
    unlinks: VecDeque<Unlink>,
    /// Sequence number of the last unlink answered ahead.
    proposed: u64,
    /// Unlinks answered ahead whose apply, and what follows it, is not
    /// done yet.
    unsettled: BTreeSet<u64>,
    /// An unlink answered ahead, or what followed it, failed: the next
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

impl Ahead {
    pub(crate) fn new() -> Ahead {
        Ahead { inner: Mutex::default(), settled: tokio::sync::watch::Sender::new(()) }
    }

    pub(crate) fn book(&self) -> MutexGuard<'_, Book> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A command that can remove a name is proposed the usual way; no
    /// unlink is answered ahead until the guard (held until it has
    /// applied) is dropped.
    pub(crate) fn removing(&self) -> Removing<'_> {
        self.book().removing += 1;
        Removing(self)
    }

    /// The state machine applied `Unlink { parent, name }` (`ok`: it
    /// succeeded), under the write lock of the state: if it was answered
    /// ahead, it leaves the overlay.
    pub(crate) fn applied(&self, parent: Ino, name: &[u8], ok: bool) {
        let mut book = self.book();
        let Some(at) = book.unlinks.iter().position(|u| u.parent == parent && u.name == name) else { return };
        book.unlinks.remove(at);
        if !ok {
            tracing::error!(
                "an unlink answered ahead failed when it applied: {:?} in directory {parent}",
                String::from_utf8_lossy(name)
            );
        }
    }

    /// Unlink `seq` answered ahead has applied and what follows it is done
    /// (`ok`: all of it succeeded), or it can no longer apply.
    pub(crate) fn settled(&self, seq: u64, ok: bool) {
        {
            let mut book = self.book();
            book.unsettled.remove(&seq);
            // Still here if the group stopped before it applied.
            book.unlinks.retain(|u| u.seq != seq);
            book.failed |= !ok;
        }
        self.settled.send_replace(());
    }

    /// Waits until every unlink answered ahead so far is settled; an
    /// error if one of them failed since the last call.
    pub(crate) async fn settle(&self) -> Result<(), Errno> {
        let want = self.book().proposed;
        let mut settled = self.settled.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = settled.wait_for(|_| self.book().unsettled.first().is_none_or(|&s| s > want)).await;
        if std::mem::take(&mut self.book().failed) { Err(Errno::EIO) } else { Ok(()) }
    }
}

impl Book {
    /// The state `state` as readers see it, with these unlinks.
    pub(crate) fn view<'a>(&'a self, state: &'a MetaState) -> View<'a> {
        View { state, unlinks: &self.unlinks }
    }

    /// Whether `Unlink { parent, name }` is sure to succeed when it
    /// applies after everything proposed so far: the inode it would
    /// remove, if so.
    pub(crate) fn can_unlink(&self, state: &MetaState, parent: Ino, name: &[u8]) -> Option<Ino> {
        if self.removing > 0 || self.unlinks.len() >= MAX_AHEAD {
            return None;
        }
        // `.` and `..` are directories: refused here, and by the state.
        self.view(state).lookup(parent, name).ok().filter(|a| a.kind != FileKind::Dir).map(|a| a.ino)
    }

    /// Records an unlink answered ahead (once it is proposed); returns
    /// its sequence number.
    pub(crate) fn answered(&mut self, parent: Ino, name: Vec<u8>, ino: Ino, now: Time) -> u64 {
        self.proposed += 1;
        let seq = self.proposed;
        self.unlinks.push_back(Unlink { seq, parent, name, ino, now });
        self.unsettled.insert(seq);
        seq
    }
}

/// Drops the count of a proposed command that can remove a name.
pub(crate) struct Removing<'a>(&'a Ahead);

impl Drop for Removing<'_> {
    fn drop(&mut self) {
        self.0.book().removing -= 1;
    }
}

/// The metadata as readers see it: the applied state, less the unlinks
/// answered ahead of their apply. It reads as [`MetaState`] does; only
/// what those unlinks change is answered here.
pub struct View<'a> {
    state: &'a MetaState,
    unlinks: &'a VecDeque<Unlink>,
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

    fn hides(&self, parent: Ino, name: &[u8]) -> bool {
        self.unlinks.iter().any(|u| u.parent == parent && u.name == name)
    }

    /// An inode's attributes.
    pub fn getattr(&self, ino: Ino) -> Result<Attr, Errno> {
        let mut attr = self.state.getattr(ino)?.clone();
        for u in self.unlinks.iter() {
            if u.parent == ino {
                attr.mtime = attr.mtime.max(u.now);
                attr.ctime = attr.ctime.max(u.now);
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
        let ino = self.state.lookup(parent, name)?.ino;
        if self.hides(parent, name) {
            return Err(Errno::ENOENT);
        }
        self.getattr(ino)
    }

    /// Entries of a directory after cookie `offset`, at most `max` (see
    /// [`MetaState::readdir`]).
    pub fn readdir(&self, dir: Ino, offset: u64, max: usize) -> Result<Vec<DirEntry>, Errno> {
        let hidden = self.unlinks.iter().filter(|u| u.parent == dir).count();
        let mut entries = self.state.readdir(dir, offset, max.saturating_add(hidden))?;
        if hidden > 0 {
            entries.retain(|e| !self.hides(dir, &e.name));
            entries.truncate(max);
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Cmd, Creator, ROOT, Reply};

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

    #[test]
    fn the_view_answers_as_the_state_will_once_the_unlinks_apply() {
        let (state, d) = tree();
        let inos: Vec<Ino> = (1..=20).collect();
        let dirs = [ROOT, d];
        let ahead = [unlink(d, "f0", 50), unlink(d, "f3", 51), unlink(ROOT, "h", 52), unlink(d, "f7", 53)];
        let mut book = Book::default();
        let mut after = state.clone();
        for cmd in &ahead {
            let Cmd::Unlink { parent, name, now } = cmd else { unreachable!() };
            let ino = book.can_unlink(&state, *parent, name).expect("a file that exists");
            book.answered(*parent, name.clone(), ino, *now);
            apply(&mut after, cmd.clone());
        }
        let none = Book::default();
        assert_eq!(
            answers(&book.view(&state), &inos, &dirs),
            answers(&none.view(&after), &inos, &dirs),
            "the view with the unlinks ahead and the state after them disagree"
        );
        // The view hides what it must: the state itself still has it.
        assert!(book.view(&state).lookup(d, b"f0").is_err() && state.lookup(d, b"f0").is_ok());
    }

    #[test]
    fn only_an_unlink_that_cannot_fail_is_answered_ahead() {
        let (state, d) = tree();
        let mut book = Book::default();
        assert_eq!(book.can_unlink(&state, d, b"missing"), None);
        assert_eq!(book.can_unlink(&state, ROOT, b"e"), None, "a directory");
        assert_eq!(book.can_unlink(&state, d, b"."), None);
        assert_eq!(book.can_unlink(&state, d, b".."), None);
        assert_eq!(book.can_unlink(&state, 999, b"f0"), None, "no such directory");
        let f0 = book.can_unlink(&state, d, b"f0").expect("a file");
        book.answered(d, b"f0".to_vec(), f0, Time(50));
        assert_eq!(book.can_unlink(&state, d, b"f0"), None, "already unlinked ahead");
        book.removing = 1;
        assert_eq!(book.can_unlink(&state, d, b"f1"), None, "a removal is in flight");
        book.removing = 0;
        for i in 1..MAX_AHEAD {
            book.answered(d, format!("x{i}").into_bytes(), 100 + i as Ino, Time(50));
        }
        assert_eq!(book.can_unlink(&state, d, b"f1"), None, "{MAX_AHEAD} are ahead");
    }

    #[test]
    fn sync_waits_for_every_unlink_answered_before_it_and_hears_of_a_failure_once() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ahead = Ahead::new();
        let seqs: Vec<u64> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, name)| ahead.book().answered(ROOT, name.as_bytes().to_vec(), 10 + i as Ino, Time(5)))
            .collect();
        {
            let _removing = ahead.removing();
            assert_eq!(ahead.book().removing, 1);
        }
        assert_eq!(ahead.book().removing, 0, "the guard gives the count back");
        ahead.applied(ROOT, b"zzz", false);
        assert_eq!(ahead.book().unlinks.len(), 3, "an unlink not answered ahead is none of the book's");
        ahead.applied(ROOT, b"a", true);
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
        ahead.applied(ROOT, b"d", true);
        ahead.settled(later, true);
        assert_eq!(rt.block_on(ahead.settle()), Ok(()), "a failure is reported once");
        assert!(ahead.book().unlinks.is_empty());
    }
}
