//! The metadata group on a blobstore: commands through openraft, the log and
//! snapshots in blobs, and what a restart (clean or not) brings back.

mod common;

use blobfs::fs::raft::{Durability, MetaOptions, MetaRaft};
use blobfs::fs::{Cmd, Creator, FileKind, ROOT, Reply, Time};
use blobfs::{BlobError, Blobstore};
use common::Harness;

const BY: Creator = Creator { uid: 0, gid: 0, now: Time(5) };

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn open(h: &mut Harness, rt: &tokio::runtime::Runtime, store: &Blobstore, opts: MetaOptions) -> MetaRaft {
    let s = store.clone();
    h.run(rt.spawn(async move { MetaRaft::open(&s, opts).await })).unwrap().unwrap()
}

fn write(h: &mut Harness, rt: &tokio::runtime::Runtime, meta: &MetaRaft, cmd: Cmd) -> Reply {
    let m = meta.clone();
    h.run(rt.spawn(async move { m.write(cmd).await })).unwrap().unwrap()
}

fn mkdir(name: String) -> Cmd {
    Cmd::Mkdir { parent: ROOT, name: name.into_bytes(), perm: 0o755, by: BY }
}

fn names(meta: &MetaRaft) -> Vec<String> {
    meta.read(|s| {
        s.readdir(ROOT, 2, usize::MAX).unwrap().into_iter().map(|e| String::from_utf8(e.name).unwrap()).collect()
    })
}

#[test]
fn synced_commands_survive_a_crash_and_the_log_replays_after_a_snapshot() {
    let (mut h, bdev) = Harness::with_malloc(1, 64, false);
    let rt = runtime();
    let store = h.format(&bdev, 64 * 1024, None);
    let meta = open(&mut h, &rt, &store, MetaOptions { durability: Durability::WriteBehind, ..Default::default() });
    for i in 0..50 {
        write(&mut h, &rt, &meta, mkdir(format!("d{i}")));
    }
    let m = meta.clone();
    h.run(rt.spawn(async move { m.snapshot().await })).unwrap().unwrap();
    for i in 50..80 {
        write(&mut h, &rt, &meta, mkdir(format!("d{i}")));
    }
    let f = match write(
        &mut h,
        &rt,
        &meta,
        Cmd::Mknod { parent: ROOT, name: b"f".to_vec(), kind: FileKind::File, perm: 0o600, rdev: 0, by: BY },
    ) {
        Reply::Entry(a) => a.ino,
        r => panic!("{r:?}"),
    };
    let m = meta.clone();
    h.run(rt.spawn(async move { m.sync().await })).unwrap().unwrap();
    let before = meta.read(|s| s.clone());

    // Power cut: the store stops without a clean unload, Raft with it.
    let (s, m) = (store.clone(), meta.clone());
    h.run(rt.spawn(async move {
        let _ = m.shutdown().await;
        s.abandon().await;
    }))
    .unwrap();
    drop(meta);
    let (store, _) = h.load(&bdev).unwrap();
    let meta = open(&mut h, &rt, &store, MetaOptions::default());
    assert_eq!(names(&meta).len(), 81);
    meta.read(|s| {
        assert_eq!(s.lookup(ROOT, b"f").unwrap().ino, f);
        s.check().unwrap();
        assert_eq!(*s, before, "the state after replay is the state before the crash");
    });
    // New inodes continue where the old ones stopped.
    let Reply::Entry(a) = write(&mut h, &rt, &meta, mkdir("after".into())) else { panic!() };
    assert!(a.ino > f);
}

#[test]
fn a_store_whose_super_blob_is_not_a_file_system_is_refused() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let rt = runtime();
    let store = h.format(&bdev, 64 * 1024, None);
    let s = store.clone();
    h.run(async move {
        let id = s.create_blob(Default::default()).await?;
        s.set_super(Some(id)).await
    })
    .unwrap();
    let s = store.clone();
    let err = h.run(rt.spawn(async move { MetaRaft::open(&s, MetaOptions::default()).await.err() })).unwrap();
    assert!(matches!(err, Some(BlobError::Corrupt { .. })), "{err:?}");
}
