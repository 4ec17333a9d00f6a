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

/// Stops the store without a clean unload (Raft with it), loads it again
/// and reopens the group.
fn power_cut(
    h: &mut Harness,
    rt: &tokio::runtime::Runtime,
    bdev: &str,
    store: Blobstore,
    meta: MetaRaft,
    opts: MetaOptions,
) -> (Blobstore, MetaRaft) {
    h.run(rt.spawn(async move {
        let _ = meta.shutdown().await;
        store.abandon().await;
    }))
    .unwrap();
    let (store, _) = h.load(bdev).unwrap();
    let meta = open(h, rt, &store, opts);
    (store, meta)
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
    let before = meta.read(|s| s.applied().clone());

    // Power cut: the store stops without a clean unload, Raft with it.
    let (_store, meta) = power_cut(&mut h, &rt, &bdev, store, meta, MetaOptions::default());
    assert_eq!(names(&meta).len(), 81);
    meta.read(|s| {
        assert_eq!(s.lookup(ROOT, b"f").unwrap().ino, f);
        s.check().unwrap();
        assert_eq!(*s.applied(), before, "the state after replay is the state before the crash");
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

/// The root blob's xattr naming the log blob, as a number.
fn log_blob(h: &mut Harness, store: &Blobstore) -> u64 {
    let s = store.clone();
    let xattrs = h.run(async move { s.xattrs(s.get_super().await?.unwrap()).await }).unwrap();
    u64::from_le_bytes(xattrs["claudefs.fs.log"].as_slice().try_into().unwrap())
}

#[test]
fn the_log_rotates_into_a_new_blob_so_a_busy_file_system_does_not_fill_its_store() {
    // 16 MiB of store; 5,000 commands of one page each (20 MiB of records)
    // fit only if the log lets go of what snapshots made obsolete.
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let rt = runtime();
    let store = h.format(&bdev, 64 * 1024, None);
    let opts = MetaOptions { snapshot_every: 500, ..Default::default() };
    let meta = open(&mut h, &rt, &store, opts.clone());
    let first = log_blob(&mut h, &store);
    for i in 0..5000 {
        let cmd = if i % 2 == 0 {
            mkdir(format!("d{}", i % 7))
        } else {
            Cmd::Rmdir { parent: ROOT, name: format!("d{}", (i - 1) % 7).into_bytes(), now: Time(6) }
        };
        write(&mut h, &rt, &meta, cmd);
    }
    write(&mut h, &rt, &meta, mkdir("last".into()));
    assert_ne!(log_blob(&mut h, &store), first, "the log moved to a new blob");
    let s = store.clone();
    let blobs = h.run(async move { s.list().await }).unwrap();
    assert!(blobs.iter().all(|b| b.id != first), "the old log blob is deleted: {blobs:?}");
    let m = meta.clone();
    h.run(rt.spawn(async move { m.sync().await })).unwrap().unwrap();
    let before = meta.read(|s| s.applied().clone());

    // A crash, and a half-done rotation: a blob the discard xattr names.
    let s = store.clone();
    let stray = h
        .run(async move {
            let stray = s.create_blob(Default::default()).await?;
            let root = s.get_super().await?.unwrap();
            s.set_xattr(root, "claudefs.fs.log.discard", &stray.to_le_bytes()).await?;
            s.sync_blob(root).await?;
            Ok::<_, BlobError>(stray)
        })
        .unwrap();
    let (store, meta) = power_cut(&mut h, &rt, &bdev, store, meta, opts);
    meta.read(|s| {
        s.check().unwrap();
        assert_eq!(*s.applied(), before, "the rotated log replays to the state before the crash");
    });
    let s = store.clone();
    let blobs = h.run(async move { s.list().await }).unwrap();
    assert!(blobs.iter().all(|b| b.id != stray), "the blob a cut-short rotation left is deleted");
    assert!(names(&meta).contains(&"last".to_string()));
}
