//! POSIX semantics of the metadata state machine, one behaviour per test.

use super::*;

const ALICE: Creator = Creator { uid: 1000, gid: 1000, now: Time(10) };

fn fs() -> MetaState {
    MetaState::new(64 * 1024, 0, 0, Time(1))
}

fn ok(s: &mut MetaState, cmd: Cmd) -> Reply {
    let before = s.clone();
    let r = s.apply(&cmd);
    match r {
        Ok(r) => {
            s.check().unwrap_or_else(|problem| panic!("after {cmd:?}: {problem}"));
            r
        }
        Err(e) => {
            assert_eq!(*s, before, "a failed command changed the state");
            panic!("{cmd:?} failed: {e}")
        }
    }
}

fn err(s: &mut MetaState, cmd: Cmd) -> Errno {
    let before = s.clone();
    match s.apply(&cmd) {
        Ok(r) => panic!("{cmd:?} succeeded: {r:?}"),
        Err(e) => {
            assert_eq!(*s, before, "{cmd:?} failed with {e} but changed the state");
            e
        }
    }
}

fn entry(r: Reply) -> Attr {
    match r {
        Reply::Entry(a) => a,
        r => panic!("not an entry: {r:?}"),
    }
}

fn mkfile(s: &mut MetaState, parent: Ino, name: &str) -> Ino {
    entry(ok(s, mknod(parent, name))).ino
}

fn mkdir(s: &mut MetaState, parent: Ino, name: &str) -> Ino {
    entry(ok(s, Cmd::Mkdir { parent, name: name.into(), perm: 0o755, by: ALICE })).ino
}

fn mknod(parent: Ino, name: &str) -> Cmd {
    Cmd::Mknod { parent, name: name.into(), kind: FileKind::File, perm: 0o644, rdev: 0, by: ALICE }
}

fn unlink(parent: Ino, name: &str) -> Cmd {
    Cmd::Unlink { parent, name: name.into(), now: Time(20) }
}

fn rmdir(parent: Ino, name: &str) -> Cmd {
    Cmd::Rmdir { parent, name: name.into(), now: Time(20) }
}

fn rename(parent: Ino, name: &str, new_parent: Ino, new_name: &str, mode: RenameMode) -> Cmd {
    Cmd::Rename { parent, name: name.into(), new_parent, new_name: new_name.into(), mode, now: Time(30) }
}

fn names(s: &MetaState, dir: Ino) -> Vec<String> {
    s.readdir(dir, 0, usize::MAX).unwrap().into_iter().map(|e| String::from_utf8(e.name).unwrap()).collect()
}

fn nlink(s: &MetaState, ino: Ino) -> u32 {
    s.getattr(ino).unwrap().nlink
}

#[test]
fn a_new_file_system_has_an_empty_root() {
    let s = fs();
    let root = s.getattr(ROOT).unwrap();
    assert_eq!((root.kind, root.perm, root.nlink), (FileKind::Dir, 0o755, 2));
    assert_eq!(names(&s, ROOT), [".", ".."]);
    assert_eq!(s.lookup(ROOT, b"..").unwrap().ino, ROOT);
}

#[test]
fn create_sets_owner_times_and_the_parents_times() {
    let mut s = fs();
    let a = entry(ok(&mut s, mknod(ROOT, "f")));
    assert_eq!((a.uid, a.gid, a.perm, a.nlink, a.size), (1000, 1000, 0o644, 1, 0));
    assert_eq!((a.atime, a.mtime, a.ctime, a.btime), (Time(10), Time(10), Time(10), Time(10)));
    let root = s.getattr(ROOT).unwrap();
    assert_eq!((root.mtime, root.ctime), (Time(10), Time(10)));
    assert_eq!(s.lookup(ROOT, b"f").unwrap().ino, a.ino);
    assert_eq!(err(&mut s, mknod(ROOT, "f")), Errno::EEXIST);
}

#[test]
fn every_kind_of_node_can_be_made() {
    let mut s = fs();
    for (name, kind, rdev) in [
        ("fifo", FileKind::Fifo, 0),
        ("sock", FileKind::Socket, 0),
        ("chr", FileKind::CharDev, 0x0103),
        ("blk", FileKind::BlockDev, 0x0801),
    ] {
        let a = entry(ok(&mut s, Cmd::Mknod { parent: ROOT, name: name.into(), kind, perm: 0o600, rdev, by: ALICE }));
        assert_eq!((a.kind, a.rdev), (kind, rdev), "{name}");
        assert_eq!(a.mode(), kind.mode_bits() | 0o600);
    }
    let by = ALICE;
    assert_eq!(
        err(&mut s, Cmd::Mknod { parent: ROOT, name: "d".into(), kind: FileKind::Dir, perm: 0, rdev: 0, by }),
        Errno::EINVAL
    );
}

#[test]
fn bad_names_get_their_errors() {
    let mut s = fs();
    let long = "x".repeat(256);
    assert_eq!(err(&mut s, mknod(ROOT, &long)), Errno::ENAMETOOLONG);
    assert_eq!(s.lookup(ROOT, long.as_bytes()).unwrap_err(), Errno::ENAMETOOLONG);
    mkfile(&mut s, ROOT, &"y".repeat(255));
    assert_eq!(err(&mut s, mknod(ROOT, "a/b")), Errno::EINVAL);
    assert_eq!(err(&mut s, mknod(ROOT, "")), Errno::EINVAL);
    assert_eq!(err(&mut s, mknod(ROOT, ".")), Errno::EEXIST);
    let f = mkfile(&mut s, ROOT, "f");
    assert_eq!(err(&mut s, mknod(f, "x")), Errno::ENOTDIR);
    assert_eq!(s.lookup(f, b"x").unwrap_err(), Errno::ENOTDIR);
    assert_eq!(err(&mut s, mknod(999, "x")), Errno::ENOENT);
}

#[test]
fn directories_count_their_subdirectories_in_nlink() {
    let mut s = fs();
    let d = mkdir(&mut s, ROOT, "d");
    assert_eq!((nlink(&s, ROOT), nlink(&s, d)), (3, 2));
    mkdir(&mut s, d, "e");
    mkfile(&mut s, d, "f");
    assert_eq!(nlink(&s, d), 3);
    assert_eq!(s.lookup(d, b"..").unwrap().ino, ROOT);
    assert_eq!(err(&mut s, rmdir(ROOT, "d")), Errno::ENOTEMPTY);
    ok(&mut s, rmdir(d, "e"));
    ok(&mut s, unlink(d, "f"));
    assert_eq!(nlink(&s, d), 2);
    assert_eq!(ok(&mut s, rmdir(ROOT, "d")), Reply::Removed { orphaned: vec![d] });
    assert_eq!(nlink(&s, ROOT), 2);
    // A removed directory takes no new entries, even while still open.
    assert_eq!(err(&mut s, mknod(d, "late")), Errno::ENOENT);
}

#[test]
fn unlink_and_rmdir_refuse_the_wrong_kind() {
    let mut s = fs();
    mkdir(&mut s, ROOT, "d");
    mkfile(&mut s, ROOT, "f");
    assert_eq!(err(&mut s, unlink(ROOT, "d")), Errno::EISDIR);
    assert_eq!(err(&mut s, rmdir(ROOT, "f")), Errno::ENOTDIR);
    assert_eq!(err(&mut s, rmdir(ROOT, ".")), Errno::EINVAL);
    assert_eq!(err(&mut s, rmdir(ROOT, "..")), Errno::ENOTEMPTY);
    assert_eq!(err(&mut s, unlink(ROOT, "nope")), Errno::ENOENT);
}

#[test]
fn hard_links_share_the_inode_and_the_last_unlink_orphans_it() {
    let mut s = fs();
    let d = mkdir(&mut s, ROOT, "d");
    let f = mkfile(&mut s, ROOT, "f");
    let a = entry(ok(&mut s, Cmd::Link { ino: f, parent: d, name: "g".into(), now: Time(15) }));
    assert_eq!((a.ino, a.nlink, a.ctime), (f, 2, Time(15)));
    assert_eq!(s.lookup(d, b"g").unwrap().ino, f);
    assert_eq!(ok(&mut s, unlink(ROOT, "f")), Reply::Removed { orphaned: vec![] });
    assert_eq!(nlink(&s, f), 1);
    assert_eq!(ok(&mut s, unlink(d, "g")), Reply::Removed { orphaned: vec![f] });
    // Still there for whoever has it open, until reclaimed.
    assert_eq!(nlink(&s, f), 0);
    assert_eq!(s.orphans().collect::<Vec<_>>(), [f]);
    assert_eq!(err(&mut s, Cmd::Link { ino: f, parent: d, name: "back".into(), now: Time(16) }), Errno::ENOENT);
    ok(&mut s, Cmd::Reclaim { inos: vec![f] });
    assert_eq!(s.getattr(f).unwrap_err(), Errno::ENOENT);
    assert_eq!(s.orphans().count(), 0);
}

#[test]
fn links_to_directories_and_onto_existing_names_are_refused() {
    let mut s = fs();
    let d = mkdir(&mut s, ROOT, "d");
    let f = mkfile(&mut s, ROOT, "f");
    assert_eq!(err(&mut s, Cmd::Link { ino: d, parent: ROOT, name: "d2".into(), now: Time(1) }), Errno::EPERM);
    assert_eq!(err(&mut s, Cmd::Link { ino: f, parent: ROOT, name: "d".into(), now: Time(1) }), Errno::EEXIST);
}

#[test]
fn symlinks_keep_their_target_and_its_length() {
    let mut s = fs();
    let target = b"../some/where".to_vec();
    let a = entry(ok(&mut s, Cmd::Symlink { parent: ROOT, name: "l".into(), target: target.clone(), by: ALICE }));
    assert_eq!((a.kind, a.size, a.perm), (FileKind::Symlink, target.len() as u64, 0o777));
    assert_eq!(s.readlink(a.ino).unwrap(), target);
    let f = mkfile(&mut s, ROOT, "f");
    assert_eq!(s.readlink(f).unwrap_err(), Errno::EINVAL);
    let long = vec![b'x'; 4096];
    assert_eq!(
        err(&mut s, Cmd::Symlink { parent: ROOT, name: "m".into(), target: long, by: ALICE }),
        Errno::ENAMETOOLONG
    );
}

#[test]
fn rename_moves_replaces_and_keeps_directory_links_right() {
    let mut s = fs();
    let a = mkdir(&mut s, ROOT, "a");
    let b = mkdir(&mut s, ROOT, "b");
    let sub = mkdir(&mut s, a, "sub");
    // A directory across directories: both parents' nlink and its `..`.
    ok(&mut s, rename(a, "sub", b, "moved", RenameMode::Replace));
    assert_eq!((nlink(&s, a), nlink(&s, b)), (2, 3));
    assert_eq!(s.lookup(sub, b"..").unwrap().ino, b);
    assert_eq!(s.getattr(sub).unwrap().ctime, Time(30));
    // Over an existing empty directory.
    let empty = mkdir(&mut s, a, "empty");
    assert_eq!(
        ok(&mut s, rename(b, "moved", a, "empty", RenameMode::Replace)),
        Reply::Removed { orphaned: vec![empty] }
    );
    assert_eq!((nlink(&s, a), nlink(&s, b)), (3, 2));
    assert_eq!(s.lookup(a, b"empty").unwrap().ino, sub);
    // A file over a file: the replaced one is orphaned.
    let f = mkfile(&mut s, ROOT, "f");
    let g = mkfile(&mut s, ROOT, "g");
    assert_eq!(ok(&mut s, rename(ROOT, "f", ROOT, "g", RenameMode::Replace)), Reply::Removed { orphaned: vec![g] });
    assert_eq!(s.lookup(ROOT, b"g").unwrap().ino, f);
    assert_eq!(s.lookup(ROOT, b"f").unwrap_err(), Errno::ENOENT);
}

#[test]
fn rename_refuses_what_posix_refuses() {
    let mut s = fs();
    let a = mkdir(&mut s, ROOT, "a");
    let sub = mkdir(&mut s, a, "sub");
    mkfile(&mut s, sub, "x");
    mkfile(&mut s, ROOT, "f");
    let full = mkdir(&mut s, ROOT, "full");
    mkfile(&mut s, full, "y");
    use RenameMode::*;
    assert_eq!(err(&mut s, rename(ROOT, "a", sub, "a2", Replace)), Errno::EINVAL, "below itself");
    assert_eq!(err(&mut s, rename(ROOT, "a", a, "a2", Replace)), Errno::EINVAL, "into itself");
    assert_eq!(err(&mut s, rename(ROOT, "a", ROOT, "f", Replace)), Errno::ENOTDIR);
    assert_eq!(err(&mut s, rename(ROOT, "f", ROOT, "a", Replace)), Errno::EISDIR);
    assert_eq!(err(&mut s, rename(ROOT, "a", ROOT, "full", Replace)), Errno::ENOTEMPTY);
    assert_eq!(err(&mut s, rename(ROOT, "nope", ROOT, "x", Replace)), Errno::ENOENT);
    assert_eq!(err(&mut s, rename(ROOT, "f", ROOT, &"z".repeat(256), Replace)), Errno::ENAMETOOLONG);
    assert_eq!(err(&mut s, rename(ROOT, "f", ROOT, "a", NoReplace)), Errno::EEXIST);
    assert_eq!(err(&mut s, rename(ROOT, "f", ROOT, "absent", Exchange)), Errno::ENOENT);
}

#[test]
fn rename_between_two_names_of_one_inode_does_nothing() {
    let mut s = fs();
    let f = mkfile(&mut s, ROOT, "f");
    ok(&mut s, Cmd::Link { ino: f, parent: ROOT, name: "g".into(), now: Time(11) });
    let before = s.clone();
    assert_eq!(ok(&mut s, rename(ROOT, "f", ROOT, "g", RenameMode::Replace)), Reply::Removed { orphaned: vec![] });
    assert_eq!(s, before);
}

#[test]
fn rename_exchange_swaps_a_file_and_a_directory_across_directories() {
    let mut s = fs();
    let a = mkdir(&mut s, ROOT, "a");
    let b = mkdir(&mut s, ROOT, "b");
    let f = mkfile(&mut s, a, "f");
    let d = mkdir(&mut s, b, "d");
    assert_eq!((nlink(&s, a), nlink(&s, b)), (2, 3));
    ok(&mut s, rename(a, "f", b, "d", RenameMode::Exchange));
    assert_eq!(s.lookup(a, b"f").unwrap().ino, d);
    assert_eq!(s.lookup(b, b"d").unwrap().ino, f);
    assert_eq!(s.lookup(d, b"..").unwrap().ino, a);
    assert_eq!((nlink(&s, a), nlink(&s, b)), (3, 2));
    // A directory may not be exchanged with something below it.
    let inner = mkdir(&mut s, d, "inner");
    assert_eq!(err(&mut s, rename(a, "f", d, "inner", RenameMode::Exchange)), Errno::EINVAL);
    assert_eq!(err(&mut s, rename(d, "inner", a, "f", RenameMode::Exchange)), Errno::EINVAL);
    let _ = inner;
}

#[test]
fn readdir_offsets_stay_stable_while_entries_come_and_go() {
    let mut s = fs();
    for i in 0..10 {
        mkfile(&mut s, ROOT, &format!("f{i}"));
    }
    let first = s.readdir(ROOT, 0, 5).unwrap();
    assert_eq!(first.len(), 5);
    let resume = first.last().unwrap().cookie;
    // Remove an entry already listed and one not yet listed; add one.
    ok(&mut s, unlink(ROOT, "f0"));
    ok(&mut s, unlink(ROOT, "f5"));
    mkfile(&mut s, ROOT, "new");
    let rest: Vec<String> =
        s.readdir(ROOT, resume, usize::MAX).unwrap().into_iter().map(|e| String::from_utf8(e.name).unwrap()).collect();
    assert_eq!(rest, ["f3", "f4", "f6", "f7", "f8", "f9", "new"]);
    // Paging through one entry at a time sees each exactly once.
    let (mut offset, mut seen) = (0, Vec::new());
    while let Some(e) = s.readdir(ROOT, offset, 1).unwrap().pop() {
        offset = e.cookie;
        seen.push(e.name);
    }
    assert_eq!(seen.len(), 2 + 9);
}

#[test]
fn set_group_id_directories_pass_on_their_group() {
    let mut s = fs();
    let d = mkdir(&mut s, ROOT, "d");
    ok(
        &mut s,
        Cmd::SetAttr {
            ino: d,
            set: SetAttr { perm: Some(0o2775), gid: Some(50), ..Default::default() },
            now: Time(12),
        },
    );
    let f = mkfile(&mut s, d, "f");
    let f = s.getattr(f).unwrap();
    assert_eq!((f.gid, f.perm), (50, 0o644));
    let sub = mkdir(&mut s, d, "sub");
    let sub = s.getattr(sub).unwrap();
    assert_eq!((sub.gid, sub.perm), (50, 0o2755));
}

#[test]
fn setattr_changes_what_it_is_given_and_always_the_ctime() {
    let mut s = fs();
    let f = mkfile(&mut s, ROOT, "f");
    let set = SetAttr { perm: Some(0o4751), uid: Some(7), gid: Some(8), atime: Some(Time(3)), ..Default::default() };
    let Reply::Attr(a, freed) = ok(&mut s, Cmd::SetAttr { ino: f, set, now: Time(40) }) else { panic!() };
    assert_eq!((a.perm, a.uid, a.gid, a.atime, a.mtime, a.ctime), (0o4751, 7, 8, Time(3), Time(10), Time(40)));
    assert!(freed.is_empty());
    let d = mkdir(&mut s, ROOT, "d");
    let trunc = SetAttr { size: Some(0), ..Default::default() };
    assert_eq!(err(&mut s, Cmd::SetAttr { ino: d, set: trunc.clone(), now: Time(41) }), Errno::EISDIR);
    let big = SetAttr { size: Some(u64::MAX), ..Default::default() };
    assert_eq!(err(&mut s, Cmd::SetAttr { ino: f, set: big, now: Time(41) }), Errno::EFBIG);
    assert_eq!(err(&mut s, Cmd::SetAttr { ino: 999, set: trunc, now: Time(41) }), Errno::ENOENT);
}

#[test]
fn dropping_privileges_takes_capabilities_and_the_set_id_bits_that_grant_something() {
    let mut s = fs();
    let f = mkfile(&mut s, ROOT, "f");
    let d = mkdir(&mut s, ROOT, "d");
    let caps = || Cmd::SetXattr {
        ino: f,
        name: b"security.capability".to_vec(),
        value: vec![1; 20],
        mode: XattrMode::Upsert,
        now: Time(20),
    };
    let perm = |perm| SetAttr { perm: Some(perm), ..Default::default() };
    let drop = |ino, set, drop| Cmd::SetAttrDropping { ino, set, drop, now: Time(30) };
    // Capabilities only: the set-ID bits stay.
    ok(&mut s, Cmd::SetAttr { ino: f, set: perm(0o6755), now: Time(21) });
    ok(&mut s, caps());
    assert!(s.would_drop(f, DropPrivs::Caps).unwrap());
    let Reply::Attr(a, _) = ok(&mut s, drop(f, SetAttr::default(), DropPrivs::Caps)) else { panic!() };
    assert_eq!((a.perm, a.ctime), (0o6755, Time(30)));
    assert_eq!(s.getxattr(f, b"security.capability"), Err(Errno::ENODATA));
    assert!(!s.would_drop(f, DropPrivs::Caps).unwrap());
    // All: set-user-ID, and set-group-ID where the group may execute.
    assert!(s.would_drop(f, DropPrivs::All).unwrap());
    let Reply::Attr(a, _) = ok(&mut s, drop(f, SetAttr::default(), DropPrivs::All)) else { panic!() };
    assert_eq!(a.perm, 0o0755);
    // Applied after the change it comes with, in the same step.
    let chown = SetAttr { uid: Some(7), ..perm(0o6745) };
    let Reply::Attr(a, _) = ok(&mut s, drop(f, chown, DropPrivs::All)) else { panic!() };
    assert_eq!((a.perm, a.uid), (0o2745, 7), "no group execute: set-group-ID marks locking and stays");
    assert!(!s.would_drop(f, DropPrivs::All).unwrap());
    // A directory keeps its bits.
    ok(&mut s, Cmd::SetAttr { ino: d, set: perm(0o2775), now: Time(31) });
    let Reply::Attr(a, _) = ok(&mut s, drop(d, SetAttr { gid: Some(9), ..Default::default() }, DropPrivs::All)) else {
        panic!()
    };
    assert_eq!((a.perm, a.gid), (0o2775, 9));
    assert_eq!(err(&mut s, drop(999, SetAttr::default(), DropPrivs::All)), Errno::ENOENT);
    assert_eq!(s.would_drop(999, DropPrivs::Caps), Err(Errno::ENOENT));
}

fn chunk(blob: u64) -> ChunkRef {
    ChunkRef { blob, page: 0, pages: 16 }
}

#[test]
fn writes_map_chunks_and_truncates_free_the_ones_past_the_end() {
    let mut s = fs();
    let cs = s.chunk_size();
    let f = mkfile(&mut s, ROOT, "f");
    // Chunks 0, 1 and 9 (a hole between): size up to the end of chunk 9.
    let chunks = vec![(0, chunk(1)), (1, chunk(2)), (9, chunk(3))];
    let Reply::Attr(a, freed) = ok(&mut s, Cmd::Write { ino: f, chunks, end: 10 * cs, now: Time(50) }) else {
        panic!()
    };
    assert_eq!((a.size, a.mtime, a.ctime), (10 * cs, Time(50), Time(50)));
    assert!(freed.is_empty());
    assert_eq!(s.usage().data_pages, 48);
    // Overwriting chunk 1 elsewhere frees the old copy.
    let Reply::Attr(_, freed) = ok(&mut s, Cmd::Write { ino: f, chunks: vec![(1, chunk(4))], end: cs, now: Time(51) })
    else {
        panic!()
    };
    assert_eq!(freed, [chunk(2)]);
    assert_eq!(s.getattr(f).unwrap().size, 10 * cs, "a write inside the file keeps its size");
    // Truncating into chunk 1 keeps chunk 0 and the first page of 1, frees
    // the rest of 1 and all of 9.
    let set = SetAttr { size: Some(cs + 100), ..Default::default() };
    let Reply::Attr(a, freed) = ok(&mut s, Cmd::SetAttr { ino: f, set, now: Time(52) }) else { panic!() };
    assert_eq!(freed, [chunk(4).sub(1, 15), chunk(3)]);
    assert_eq!((a.size, a.mtime), (cs + 100, Time(52)));
    assert_eq!(s.extents(f, 0).unwrap().collect::<Vec<_>>(), [(0, chunk(1)), (16, chunk(4).sub(0, 1))]);
    assert_eq!(s.usage().data_pages, 17);
    // Unlinked and reclaimed: every page comes back.
    ok(&mut s, unlink(ROOT, "f"));
    let Reply::Freed(freed) = ok(&mut s, Cmd::Reclaim { inos: vec![f] }) else { panic!() };
    assert_eq!(freed, [chunk(1), chunk(4).sub(0, 1)]);
    assert_eq!(s.usage(), Usage { inodes: 1, data_pages: 0 });
}

#[test]
fn extents_are_cut_by_writes_and_punches_of_whole_units() {
    let mut s = MetaState::new(4096, 0, 0, Time(1));
    let f = mkfile(&mut s, ROOT, "f");
    let run = |page, pages| ChunkRef { blob: 1, page, pages };
    let write = |chunks| Cmd::Write { ino: f, chunks, end: 8 * 4096, now: Time(60) };
    ok(&mut s, write(vec![(0, run(100, 8))]));
    // Pages 2 and 3 rewritten: the extent is cut around them.
    let Reply::Attr(_, freed) = ok(&mut s, write(vec![(2, run(200, 2))])) else { panic!() };
    assert_eq!(freed, [run(102, 2)]);
    let extents: Vec<_> = s.extents(f, 0).unwrap().collect();
    assert_eq!(extents, [(0, run(100, 2)), (2, run(200, 2)), (4, run(104, 4))]);
    assert_eq!(s.extents(f, 3).unwrap().next(), Some((2, run(200, 2))), "the extent holding page 3 comes first");
    assert_eq!(s.extents(f, 8).unwrap().next(), None);
    // Punching pages 1 to 5 frees parts of three extents.
    let punch = Cmd::PunchRange { ino: f, holes: (1, 5), chunks: vec![], now: Time(61) };
    let Reply::Attr(a, freed) = ok(&mut s, punch) else { panic!() };
    assert_eq!(freed, [run(101, 1), run(200, 2), run(104, 1)]);
    assert_eq!(a.size, 8 * 4096, "punching keeps the size");
    let extents: Vec<_> = s.extents(f, 0).unwrap().collect();
    assert_eq!(extents, [(0, run(100, 1)), (5, run(105, 3))]);
    // The list-of-units form older builds logged does the same.
    let legacy = Cmd::Punch { ino: f, holes: vec![0, 6], chunks: vec![], now: Time(62) };
    let Reply::Attr(_, freed) = ok(&mut s, legacy) else { panic!() };
    assert_eq!(freed, [run(100, 1), run(106, 1)]);
    assert_eq!(s.usage().data_pages, 2);
    s.check().unwrap();
    // Malformed extents and ranges change nothing.
    assert_eq!(err(&mut s, write(vec![(0, run(1, 0))])), Errno::EINVAL);
    let backwards = Cmd::PunchRange { ino: f, holes: (5, 1), chunks: vec![], now: Time(63) };
    assert_eq!(err(&mut s, backwards), Errno::EINVAL);
    assert_eq!(err(&mut s, write(vec![(u64::MAX / 4096, run(1, 1))])), Errno::EINVAL);
}

#[test]
fn xattrs_follow_create_and_replace_rules_and_their_bounds() {
    let mut s = fs();
    let f = mkfile(&mut s, ROOT, "f");
    let set = |name: &str, value: &[u8], mode| Cmd::SetXattr {
        ino: f,
        name: name.into(),
        value: value.to_vec(),
        mode,
        now: Time(60),
    };
    ok(&mut s, set("user.a", b"1", XattrMode::Create));
    assert_eq!(err(&mut s, set("user.a", b"2", XattrMode::Create)), Errno::EEXIST);
    assert_eq!(err(&mut s, set("user.b", b"2", XattrMode::Replace)), Errno::ENODATA);
    ok(&mut s, set("user.a", b"3", XattrMode::Replace));
    ok(&mut s, set("system.posix_acl_access", b"acl", XattrMode::Upsert));
    ok(&mut s, set("security.selinux", b"ctx", XattrMode::Upsert));
    assert_eq!(s.getxattr(f, b"user.a").unwrap(), b"3");
    assert_eq!(s.getattr(f).unwrap().ctime, Time(60));
    let listed: Vec<&[u8]> = s.listxattr(f).unwrap().collect();
    assert_eq!(listed, [&b"security.selinux"[..], b"system.posix_acl_access", b"user.a"]);
    assert_eq!(err(&mut s, set("os2.x", b"", XattrMode::Upsert)), Errno::EOPNOTSUPP);
    assert_eq!(err(&mut s, set("user.", b"", XattrMode::Upsert)), Errno::EOPNOTSUPP);
    assert_eq!(err(&mut s, set(&format!("user.{}", "n".repeat(251)), b"", XattrMode::Upsert)), Errno::ERANGE);
    assert_eq!(err(&mut s, set("user.big", &vec![0; 65 * 1024], XattrMode::Upsert)), Errno::E2BIG);
    ok(&mut s, Cmd::RemoveXattr { ino: f, name: "user.a".into(), now: Time(61) });
    assert_eq!(s.getxattr(f, b"user.a").unwrap_err(), Errno::ENODATA);
    assert_eq!(err(&mut s, Cmd::RemoveXattr { ino: f, name: "user.a".into(), now: Time(62) }), Errno::ENODATA);
}

#[test]
fn the_state_survives_a_serde_round_trip() {
    let mut s = fs();
    let d = mkdir(&mut s, ROOT, "d");
    mkfile(&mut s, d, "f");
    let bytes = postcard::to_stdvec(&s).unwrap();
    let back: MetaState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, s);
}

mod random {
    //! Random command sequences: whatever succeeds or fails, the structure
    //! checks after every command, and a failed command changes nothing.

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Mknod(usize, u8),
        Mkdir(usize, u8),
        Symlink(usize, u8),
        Link(usize, usize, u8),
        Unlink(usize, u8),
        Rmdir(usize, u8),
        Rename(usize, u8, usize, u8, u8),
        Truncate(usize, u64),
        Write(usize, u64, u32, u8),
        Punch(usize, u64, u64),
        Reclaim,
    }

    fn op() -> impl Strategy<Value = Op> {
        let (i, n) = (0..64usize, 0..6u8);
        prop_oneof![
            (i.clone(), n.clone()).prop_map(|(d, n)| Op::Mknod(d, n)),
            (i.clone(), n.clone()).prop_map(|(d, n)| Op::Mkdir(d, n)),
            (i.clone(), n.clone()).prop_map(|(d, n)| Op::Symlink(d, n)),
            (i.clone(), i.clone(), n.clone()).prop_map(|(a, d, n)| Op::Link(a, d, n)),
            (i.clone(), n.clone()).prop_map(|(d, n)| Op::Unlink(d, n)),
            (i.clone(), n.clone()).prop_map(|(d, n)| Op::Rmdir(d, n)),
            (i.clone(), n.clone(), i.clone(), n.clone(), 0..3u8).prop_map(|(a, x, b, y, m)| Op::Rename(a, x, b, y, m)),
            (i.clone(), 0..400_000u64).prop_map(|(f, s)| Op::Truncate(f, s)),
            (i.clone(), 0..8u64, 1..40u32, 0..3u8).prop_map(|(f, c, p, b)| Op::Write(f, c, p, b)),
            (i, 0..10u64, 0..10u64).prop_map(|(f, a, b)| Op::Punch(f, a.min(b), a.max(b))),
            Just(Op::Reclaim),
        ]
    }

    /// Inode numbers in use, directories first: indices pick among them.
    fn inodes(s: &MetaState, dirs: bool) -> Vec<Ino> {
        let mut out = vec![ROOT];
        let mut todo = vec![ROOT];
        while let Some(d) = todo.pop() {
            for e in s.readdir(d, 2, usize::MAX).unwrap() {
                if e.kind == FileKind::Dir {
                    todo.push(e.ino);
                }
                if (e.kind == FileKind::Dir) == dirs && !out.contains(&e.ino) {
                    out.push(e.ino);
                }
            }
        }
        if !dirs {
            out.remove(0);
        }
        out
    }

    fn pick(v: &[Ino], i: usize) -> Ino {
        if v.is_empty() { 999 } else { v[i % v.len()] }
    }

    fn name(n: u8) -> Vec<u8> {
        format!("n{n}").into_bytes()
    }

    fn to_cmd(s: &MetaState, op: &Op, now: Time) -> Cmd {
        let dirs = inodes(s, true);
        let files = inodes(s, false);
        let by = Creator { uid: 1, gid: 1, now };
        match *op {
            Op::Mknod(d, n) => {
                Cmd::Mknod { parent: pick(&dirs, d), name: name(n), kind: FileKind::File, perm: 0o644, rdev: 0, by }
            }
            Op::Mkdir(d, n) => Cmd::Mkdir { parent: pick(&dirs, d), name: name(n), perm: 0o755, by },
            Op::Symlink(d, n) => Cmd::Symlink { parent: pick(&dirs, d), name: name(n), target: b"t".to_vec(), by },
            Op::Link(f, d, n) => Cmd::Link { ino: pick(&files, f), parent: pick(&dirs, d), name: name(n), now },
            Op::Unlink(d, n) => Cmd::Unlink { parent: pick(&dirs, d), name: name(n), now },
            Op::Rmdir(d, n) => Cmd::Rmdir { parent: pick(&dirs, d), name: name(n), now },
            Op::Rename(a, x, b, y, m) => Cmd::Rename {
                parent: pick(&dirs, a),
                name: name(x),
                new_parent: pick(&dirs, b),
                new_name: name(y),
                mode: [RenameMode::Replace, RenameMode::NoReplace, RenameMode::Exchange][m as usize],
                now,
            },
            Op::Truncate(f, size) => {
                Cmd::SetAttr { ino: pick(&files, f), set: SetAttr { size: Some(size), ..Default::default() }, now }
            }
            Op::Write(f, c, pages, blob) => Cmd::Write {
                ino: pick(&files, f),
                chunks: vec![(c, ChunkRef { blob: u64::from(blob), page: c * 16, pages })],
                end: (c + 1) * s.chunk_size(),
                now,
            },
            Op::Punch(f, a, b) => Cmd::PunchRange { ino: pick(&files, f), holes: (a, b), chunks: vec![], now },
            Op::Reclaim => Cmd::Reclaim { inos: s.orphans().collect() },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn the_structure_holds_whatever_commands_come(ops in proptest::collection::vec(op(), 1..80)) {
            let mut s = fs();
            for (i, op) in ops.iter().enumerate() {
                let cmd = to_cmd(&s, op, Time(100 + i as i64));
                let before = s.clone();
                if let Err(e) = s.apply(&cmd) {
                    prop_assert_eq!(&s, &before, "{:?} failed with {} but changed the state", cmd, e);
                }
                if let Err(problem) = s.check() {
                    return Err(TestCaseError::fail(format!("after {cmd:?}: {problem}")));
                }
            }
        }
    }
}
