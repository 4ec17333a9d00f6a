//! File data end to end on a blobstore: writes and reads against a model,
//! holes, truncates, unlinked-but-open files, a full device, and a restart.

mod common;

use blobfs::Blobstore;
use blobfs::fs::raft::MetaOptions;
use blobfs::fs::{Cmd, Creator, Errno, FileKind, FileSystem, Ino, KeySource, ROOT, Reply, SetAttr, Time, XattrMode};
use common::{Harness, pattern};

const BY: Creator = Creator { uid: 0, gid: 0, now: Time(5) };
/// The scale of requests: several map units of either size below.
const CHUNK: u64 = 16 * 1024;
/// The map unit of a new file system.
const UNIT: u64 = 4096;

struct Fx {
    h: Harness,
    rt: tokio::runtime::Runtime,
    fs: std::sync::Arc<FileSystem>,
    store: Blobstore,
    bdev: String,
    unit: u64,
    /// The master key the file system is opened with.
    key: Option<KeySource>,
}

impl Fx {
    fn new(mib: u64) -> Fx {
        Self::on(mib, false, UNIT)
    }

    /// On a malloc bdev of `mib` MiB, behind a crash bdev if `crash` (which
    /// serves one channel: then one reactor), with map units of `unit`.
    fn on(mib: u64, crash: bool, unit: u64) -> Fx {
        Self::keyed(mib, crash, unit, None)
    }

    /// [`Fx::on`], opened with a master key.
    fn keyed(mib: u64, crash: bool, unit: u64, key: Option<KeySource>) -> Fx {
        let (h, bdev) = Harness::with_malloc(if crash { 1 } else { 2 }, mib, crash);
        Self::on_bdev(h, bdev, unit, key)
    }

    /// On a malloc bdev of `mib` MiB behind an error bdev (`EE_M0`).
    fn with_error_bdev(mib: u64) -> Fx {
        let (h, _) = Harness::with_malloc(2, mib, false);
        let config = nvme::error_bdev::ErrorConfig { base_name: "M0".into(), uuid: None };
        nvme::error_bdev::create(&h.registry, &config).unwrap();
        Self::on_bdev(h, "EE_M0".into(), UNIT, None)
    }

    fn on_bdev(mut h: Harness, bdev: String, unit: u64, key: Option<KeySource>) -> Fx {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let store = h.format(&bdev, 64 * 1024, None);
        let fs = Self::open_fs(&mut h, &rt, &store, unit, key.clone()).unwrap();
        Fx { h, rt, fs, store, bdev, unit, key }
    }

    /// Opens (making it, with map units of `unit`, if there is none) the
    /// file system on `store`.
    fn open_fs(
        h: &mut Harness,
        rt: &tokio::runtime::Runtime,
        store: &Blobstore,
        unit: u64,
        key: Option<KeySource>,
    ) -> Result<std::sync::Arc<FileSystem>, blobfs::BlobError> {
        let (s, reactors) = (store.clone(), h.reactors.iter().map(|r| r.handle()).collect());
        let opts = MetaOptions { chunk_size: unit, ..Default::default() };
        h.run(rt.spawn(async move { FileSystem::open_keyed(&s, reactors, opts, key).await }))
            .unwrap()
            .map(std::sync::Arc::new)
    }

    /// Stops the file system and abandons the store as a power cut would
    /// leave it (after whatever was synced); returns the bdev's store
    /// loaded again.
    fn stop_and_reload(&mut self) -> Blobstore {
        self.abandon();
        self.h.load(&self.bdev).unwrap().0
    }

    /// Stops the file system (syncing what it can) and abandons its store.
    fn abandon(&mut self) {
        let (fs, store) = (self.fs.clone(), self.store.clone());
        self.h
            .run(self.rt.spawn(async move {
                let _ = fs.shutdown().await;
                store.abandon().await;
            }))
            .unwrap();
    }

    /// [`Fx::stop_and_reload`], then opens the file system again.
    fn restart(&mut self) {
        let store = self.stop_and_reload();
        self.fs = Fx::open_fs(&mut self.h, &self.rt, &store, self.unit, self.key.clone()).unwrap();
        self.store = store;
    }

    /// Cuts the crash bdev's power (`mode` says what happens to writes not
    /// yet flushed), then loads the store and opens the file system again.
    fn power_cut(&mut self, mode: nvme::crash::PowerCutMode, seed: u64) {
        use nvme::crash::{self, PowerCutConfig, PowerState};
        crash::power_cut(&self.h.registry, &PowerCutConfig { name: "C0".into(), mode, seed }).unwrap();
        while crash::status(&self.h.registry, "C0").unwrap().state != PowerState::Off {
            self.h.step();
        }
        self.abandon();
        crash::power_on(&self.h.registry, "C0").unwrap();
        // The dead store's last requests may still hold the crash bdev's one
        // channel for a moment.
        let mut tries = 0;
        let (store, _) = loop {
            match self.h.load(&self.bdev) {
                Ok(loaded) => break loaded,
                Err(e) if tries < 100 && e.to_string().contains("one channel at a time") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    (0..100).for_each(|_| self.h.step());
                }
                Err(e) => panic!("seed {seed}: reload: {e}"),
            }
        };
        self.fs = Fx::open_fs(&mut self.h, &self.rt, &store, self.unit, self.key.clone()).unwrap();
        self.store = store;
    }

    /// Sets the data-reduction policy of `ino` (a directory passes it on).
    fn set_policy(&mut self, ino: Ino, policy: &str) -> Result<Reply, Errno> {
        let cmd = Cmd::SetXattr {
            ino,
            name: b"claudefs.reduce".to_vec(),
            value: policy.as_bytes().to_vec(),
            mode: XattrMode::Upsert,
            now: Time(3),
        };
        self.apply(cmd)
    }

    /// Runs the reduce audit; panics unless it is clean.
    fn audit_clean(&mut self, what: &str) -> blobfs::fs::AuditReport {
        let report = self.run(|fs| Box::pin(async move { fs.reduce_audit(false).await })).unwrap();
        assert!(report.clean(), "{what}: audit: {report:?}");
        report
    }

    fn run<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(std::sync::Arc<FileSystem>) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>>,
    ) -> T {
        let fut = f(self.fs.clone());
        self.h.run(self.rt.spawn(fut)).unwrap()
    }

    /// A write staged from this thread as FUSE's request threads stage it
    /// (`direct`: as O_DIRECT): `None` if it would have to wait (nothing
    /// done), else its answer, which for a direct write comes from the
    /// reactor once the device has the bytes (a buffered one is answered at
    /// once, and no reactor runs before it is).
    fn try_now(&mut self, ino: Ino, offset: u64, data: &[u8], direct: bool) -> Option<Result<(), Errno>> {
        self.try_now_at(ino, offset, data, direct, Time(9))
    }

    /// [`Fx::try_now`] at the time `now`.
    fn try_now_at(&mut self, ino: Ino, offset: u64, data: &[u8], direct: bool, now: Time) -> Option<Result<(), Errno>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answer = move |r| tx.send(r).unwrap();
        self.fs.try_write_now(ino, offset, data, now, direct, answer).ok()?;
        Some(self.h.run(rx).unwrap())
    }

    fn create(&mut self, name: &str) -> Ino {
        let cmd = Cmd::Mknod { parent: ROOT, name: name.into(), kind: FileKind::File, perm: 0o644, rdev: 0, by: BY };
        match self.run(|fs| Box::pin(async move { fs.apply(cmd).await })).unwrap() {
            Reply::Entry(a) => a.ino,
            r => panic!("{r:?}"),
        }
    }

    fn write(&mut self, ino: Ino, offset: u64, data: Vec<u8>) -> Result<u64, Errno> {
        self.run(move |fs| Box::pin(async move { fs.write(ino, offset, &data, Time(9)).await.map(|a| a.size) }))
    }

    /// Reads from a task, and (once that has settled the file) as FUSE's
    /// request threads do, answered by the reactor: both must agree.
    fn read(&mut self, ino: Ino, offset: u64, size: usize) -> Vec<u8> {
        let read = self.run(move |fs| Box::pin(async move { fs.read(ino, offset, size).await })).unwrap();
        if let Some(now) = self.read_now(ino, offset, size) {
            assert_eq!(now.as_ref(), Ok(&read), "read of {size} bytes at {offset} answered by the reactor");
        }
        read
    }

    /// A read answered by the reactor (`None`: left to a task).
    fn read_now(&mut self, ino: Ino, offset: u64, size: usize) -> Option<Result<Vec<u8>, Errno>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.fs.try_read_now(ino, offset, size, move |r| tx.send(r.map(<[u8]>::to_vec)).unwrap()).ok()?;
        Some(self.h.run(rx).unwrap())
    }

    fn truncate(&mut self, ino: Ino, size: u64) {
        let set = SetAttr { size: Some(size), ..Default::default() };
        self.run(move |fs| Box::pin(async move { fs.setattr(ino, set, None, Time(11)).await })).unwrap();
    }

    fn fallocate(&mut self, ino: Ino, offset: u64, len: u64, mode: i32) -> Result<u64, Errno> {
        self.run(move |fs| {
            Box::pin(async move { fs.fallocate(ino, offset, len, mode, Time(13)).await.map(|a| a.size) })
        })
    }

    fn apply(&mut self, cmd: Cmd) -> Result<Reply, Errno> {
        self.run(move |fs| Box::pin(async move { fs.apply(cmd).await }))
    }
}

/// Applies a write to the model file.
fn model_write(model: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[offset as usize..end].copy_from_slice(data);
}

/// Applies a fallocate to the model file.
fn model_fallocate(model: &mut Vec<u8>, offset: u64, len: u64, mode: i32) {
    let end = (offset + len) as usize;
    if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && model.len() < end {
        model.resize(end, 0);
    }
    if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
        let to = end.min(model.len());
        if (offset as usize) < to {
            model[offset as usize..to].fill(0);
        }
    }
}

const FALLOCATE_MODES: [i32; 5] = [
    0,
    libc::FALLOC_FL_KEEP_SIZE,
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    libc::FALLOC_FL_ZERO_RANGE,
    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
];

#[test]
fn random_writes_truncates_fallocates_and_reads_match_a_model_and_survive_a_restart() {
    model_test(UNIT);
}

/// Units of several pages, as file systems made before extents have (1 MiB).
#[test]
fn the_model_holds_with_units_of_several_pages() {
    model_test(CHUNK);
}

fn model_test(unit: u64) {
    model_run(Fx::on(64, false, unit), None, 300);
}

/// A key file (32 random bytes) in a directory that lives as long as the
/// returned guard.
fn key_file(seed: u8) -> (tempfile::TempDir, KeySource) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, [seed; 32]).unwrap();
    (dir, KeySource::File(path))
}

/// Every policy combination: fixed and content-defined chunks, each
/// compression, with and without encryption; reads, writes across and inside
/// chunks, truncates, punched holes, garbage collection and a restart.
#[test]
fn reduced_files_match_a_model_under_every_policy() {
    let (_dir, key) = key_file(7);
    for chunking in ["fixed:4k", "cdc:1k:4k:16k"] {
        for compression in ["none", "lz4", "zstd:3"] {
            for enc in ["", ",enc"] {
                let fx = Fx::keyed(64, false, UNIT, Some(key.clone()));
                model_run(fx, Some(&format!("{chunking},{compression}{enc}")), 100);
            }
        }
    }
}

fn model_run(mut fx: Fx, policy: Option<&str>, steps: u64) {
    if let Some(p) = policy {
        fx.set_policy(ROOT, p).unwrap();
    }
    let ino = fx.create("f");
    let mut model = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    for step in 0..steps {
        match rng.u8(..12) {
            0 => {
                let size = rng.u64(..6 * CHUNK);
                fx.truncate(ino, size);
                model.resize(size as usize, 0);
            }
            1 => {
                // Ranges inside one chunk, across several, and past the end.
                let (offset, len) = (rng.u64(..8 * CHUNK), rng.u64(1..3 * CHUNK));
                let mode = FALLOCATE_MODES[rng.usize(..FALLOCATE_MODES.len())];
                let size = fx.fallocate(ino, offset, len, mode).unwrap();
                model_fallocate(&mut model, offset, len, mode);
                assert_eq!(size, model.len() as u64, "size after fallocate {mode:#x} at step {step}");
            }
            n => {
                // Offsets inside and across units, sometimes far past the
                // end (a hole); a third of them of whole pages.
                let (mut offset, mut len) = (rng.u64(..8 * CHUNK), rng.usize(1..3 * CHUNK as usize));
                if n % 3 == 0 {
                    (offset, len) = (offset / 4096 * 4096, len.next_multiple_of(4096));
                }
                let data = pattern(step, len);
                let size = fx.write(ino, offset, data.clone()).unwrap();
                model_write(&mut model, offset, &data);
                assert_eq!(size, model.len() as u64, "size after step {step}");
            }
        }
        let offset = rng.u64(..(model.len() as u64 + 100));
        let size = rng.usize(..4 * CHUNK as usize);
        let want = model.get(offset as usize..(offset as usize + size).min(model.len())).unwrap_or(&[]);
        assert_eq!(fx.read(ino, offset, size), want, "read of {size} at {offset} after step {step}");
    }
    assert_eq!(fx.read(ino, 0, model.len() + 10), model);
    if policy.is_some() {
        assert!(fx.fs.reduce_stats().totals.chunks > 0, "{policy:?}: nothing stored reduced");
        let gc = fx.run(|fs| Box::pin(async move { fs.collect_garbage().await })).unwrap();
        assert!(gc.frames > 0, "{policy:?}: garbage collection moved nothing: {:?}", fx.fs.reduce_stats());
        assert_eq!(fx.read(ino, 0, model.len() + 10), model, "{policy:?}: after garbage collection");
        fx.audit_clean(&format!("{policy:?}"));
    }
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();

    // Power cut after the sync, restart: the same bytes.
    fx.restart();
    assert_eq!(fx.read(ino, 0, model.len() + 10), model);
    if policy.is_some() {
        fx.audit_clean(&format!("{policy:?} after a restart"));
    }
}

/// Writes of whole pages run side by side, writes of parts of pages wait for
/// each other: neighbours that share a page must not lose each other's bytes.
#[test]
fn concurrent_writes_to_one_file_lose_nothing() {
    for behind in [false, true] {
        concurrent_writes(behind);
    }
}

/// [`concurrent_writes_to_one_file_lose_nothing`], written behind or not.
fn concurrent_writes(behind: bool) {
    let mut fx = Fx::new(64);
    let ino = fx.create("f");
    // 24 writers of 3000 bytes side by side (sharing pages), 24 of whole
    // pages in the second half, all at once, three rounds.
    const PARTS: u64 = 24;
    let half = PARTS * 3000usize.next_multiple_of(4096) as u64;
    let mut model = vec![0u8; (half + PARTS * 8192) as usize];
    for round in 0..3u64 {
        let mut writes = Vec::new();
        for i in 0..PARTS {
            writes.push((i * 3000, pattern(round * 100 + i, 3000)));
            writes.push((half + i * 8192, pattern(round * 100 + 50 + i, 8192)));
        }
        fastrand::Rng::with_seed(round).shuffle(&mut writes);
        for (offset, data) in &writes {
            model_write(&mut model, *offset, data);
        }
        fx.run(move |fs| {
            Box::pin(async move {
                let tasks: Vec<_> = writes
                    .into_iter()
                    .map(|(offset, data)| {
                        let fs = fs.clone();
                        tokio::spawn(async move {
                            match behind {
                                true => fs.write_behind(ino, offset, &data, Time(9)).await,
                                false => fs.write(ino, offset, &data, Time(9)).await.map(drop),
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
            })
        });
        assert_eq!(fx.read(ino, 0, model.len()), model, "round {round}, behind: {behind}");
    }
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
}

/// Writes behind their replies, one after another with nothing read in
/// between (whole pages, parts of pages, the same bytes again, past the
/// end): the attributes and the bytes read right after are the last
/// writes', and an fsync makes them survive a power cut.
#[test]
fn writes_behind_their_replies_read_back_in_order_and_survive_a_power_cut_after_fsync() {
    let mut fx = Fx::on(64, true, UNIT);
    let ino = fx.create("f");
    let mut model = Vec::new();
    let mut rng = fastrand::Rng::with_seed(11);
    let (mut staged_now, mut staged_direct) = (0, 0);
    for round in 0..6u64 {
        let mut writes = Vec::new();
        for i in 0..40 {
            let (mut offset, mut len) = (rng.u64(..8 * CHUNK), rng.usize(1..3 * CHUNK as usize));
            if i % 2 == 0 {
                (offset, len) = (offset / 4096 * 4096, len.next_multiple_of(4096));
            }
            if i % 5 == 4 {
                // The bytes of the write before, again.
                (offset, len) = writes.last().map(|(o, d): &(u64, Vec<u8>)| (*o, d.len())).unwrap();
            }
            let data = pattern(round * 100 + i, len);
            model_write(&mut model, offset, &data);
            writes.push((offset, data));
        }
        // Every other write is staged from this thread where it need not
        // wait (as FUSE's request threads do), half of those as O_DIRECT
        // ones (answered once written, mapped behind); the rest from a task.
        for (i, (offset, data)) in writes.into_iter().enumerate() {
            let now = match i % 4 {
                0 => fx.try_now(ino, offset, &data, false),
                2 => fx.try_now(ino, offset, &data, true).inspect(|_| staged_direct += 1),
                _ => None,
            };
            match now {
                Some(r) => {
                    r.unwrap();
                    staged_now += 1;
                }
                None => fx
                    .run(move |fs| Box::pin(async move { fs.write_behind(ino, offset, &data, Time(9)).await }))
                    .unwrap(),
            }
        }
        let size = fx.run(move |fs| Box::pin(async move { fs.settled_attr(ino).await.map(|a| a.size) })).unwrap();
        assert_eq!(size, model.len() as u64, "size after round {round}");
        assert_eq!(fx.read(ino, 0, model.len() + 10), model, "round {round}");
        if round % 2 == 1 {
            let size = rng.u64(..model.len() as u64);
            fx.truncate(ino, size);
            model.truncate(size as usize);
        }
    }
    assert!(staged_now > 0 && staged_direct > 0, "no write was staged without waiting: {staged_direct} direct");
    fx.run(move |fs| Box::pin(async move { fs.fsync(ino, None).await })).unwrap();
    // Whatever was not flushed is lost.
    fx.power_cut(nvme::crash::PowerCutMode::Drop, 11);
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
    assert_eq!(fx.read(ino, 0, model.len() + 10), model, "after the power cut");
}

/// `O_DIRECT` writes of whole pages the file maps go over them in place: the
/// map and the free space stay as they were, and the times move only when a
/// write comes in a later 4 ms than the last one that set them (or they lie
/// ahead of it), before its answer. Whatever needs pages still takes new
/// ones: holes, bytes past the end, a file with writes behind. fsync makes
/// the overwrites survive a power cut; without it, a power cut leaves each
/// block old or new, and the file system whole.
#[test]
fn direct_overwrites_of_mapped_pages_go_in_place_and_survive_a_power_cut_after_fsync() {
    const MS: i64 = 1_000_000;
    let mut fx = Fx::on(64, true, UNIT);
    let ino = fx.create("f");
    let mut model = pattern(1, 32 * 4096);
    fx.write(ino, 0, model.clone()).unwrap();
    let map = |fx: &mut Fx| -> Vec<(u64, u64, u32)> {
        fx.fs.meta().read(|s| s.extents(ino, 0).unwrap().map(|(p, c)| (p, c.page, c.pages)).collect())
    };
    let times = |fx: &mut Fx| {
        let a = fx.run(move |fs| Box::pin(async move { fs.settled_attr(ino).await })).unwrap();
        (a.mtime, a.ctime, a.size)
    };
    let (before, free) = (map(&mut fx), fx.fs.space().1);
    // Times set by the write above: Time(9). A write in the same 4 ms
    // leaves them; one in a later span, or before times that lie ahead,
    // sets them.
    let overwrite = |fx: &mut Fx, model: &mut Vec<u8>, offset: u64, pages: usize, seed: u64, now: Time| {
        let data = pattern(seed, pages * 4096);
        assert_eq!(fx.try_now_at(ino, offset, &data, true, now), Some(Ok(())), "overwrite at {offset}");
        model_write(model, offset, &data);
    };
    overwrite(&mut fx, &mut model, 4096, 3, 2, Time(3 * MS));
    assert_eq!((map(&mut fx), fx.fs.space().1), (before.clone(), free), "in place: no page taken or freed");
    assert!(!fx.fs.writing(ino), "nothing behind");
    assert_eq!(times(&mut fx), (Time(9), Time(9), 32 * 4096), "times unchanged");
    overwrite(&mut fx, &mut model, 20 * 4096, 12, 3, Time(4 * MS + 1));
    assert_eq!(map(&mut fx), before, "a later span: still in place");
    assert_eq!(times(&mut fx), (Time(4 * MS + 1), Time(4 * MS + 1), 32 * 4096), "and the times moved");
    let future = SetAttr { mtime: Some(Time(1 << 60)), ..Default::default() };
    fx.run(move |fs| Box::pin(async move { fs.setattr(ino, future, None, Time(5 * MS)).await })).unwrap();
    overwrite(&mut fx, &mut model, 0, 1, 4, Time(5 * MS + 7));
    assert_eq!(times(&mut fx).0, Time(5 * MS + 7), "an mtime ahead of the write is set back to it");
    assert_eq!(fx.read(ino, 0, model.len() + 10), model);

    // What needs pages takes new ones: past the end, a hole, and a file
    // with a write behind (the overwrite must not land under its map).
    overwrite(&mut fx, &mut model, 31 * 4096, 2, 5, Time(5 * MS + 8));
    fx.truncate(ino, 40 * 4096);
    model.resize(40 * 4096, 0);
    overwrite(&mut fx, &mut model, 36 * 4096, 1, 6, Time(5 * MS + 9));
    let data = pattern(7, 4096);
    assert_eq!(fx.try_now(ino, 8 * 4096, &data, false), Some(Ok(())));
    model_write(&mut model, 8 * 4096, &data);
    assert!(fx.fs.writing(ino));
    overwrite(&mut fx, &mut model, 8 * 4096, 1, 8, Time(5 * MS + 10));
    assert_eq!(fx.read(ino, 0, model.len() + 10), model, "the overwrite came after the write behind");
    let after = map(&mut fx);
    let page_of = |m: &[(u64, u64, u32)], p: u64| {
        m.iter().find(|&&(first, _, n)| first <= p && p < first + u64::from(n)).map(|&(first, at, _)| at + p - first)
    };
    // (Page 8's new page may be its old one again, freed by the write behind
    // and taken by the overwrite: the bytes read below say which came last.)
    for p in [31, 32, 36] {
        assert_ne!(page_of(&after, p), page_of(&before, p), "page {p} went to a new page");
    }
    for p in (0..31).filter(|&p| p != 8) {
        assert_eq!(page_of(&after, p), page_of(&before, p), "page {p} stayed where it was");
    }

    // fsync, then overwrites in place that leave the times (no command, so
    // no log record whose flush would take them along); a power cut that
    // drops what was not flushed leaves the synced bytes.
    overwrite(&mut fx, &mut model, 0, 1, 9, Time(5 * MS + 10));
    fx.run(move |fs| Box::pin(async move { fs.fsync(ino, None).await })).unwrap();
    let synced = model.clone();
    for (i, page) in [2u64, 3, 17, 25].into_iter().enumerate() {
        overwrite(&mut fx, &mut model, page * 4096, 2, 20 + i as u64, Time(5 * MS + 10));
    }
    assert_eq!(map(&mut fx), after, "in place");
    fx.power_cut(nvme::crash::PowerCutMode::Drop, 3);
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
    assert_eq!(fx.read(ino, 0, synced.len() + 10), synced, "unsynced overwrites dropped");

    // Overwrites then fsync survive; later ones, cut at random, leave each
    // block old or new.
    let mut model = synced;
    for (i, page) in [1u64, 9, 30].into_iter().enumerate() {
        overwrite(&mut fx, &mut model, page * 4096, 1, 30 + i as u64, Time(5 * MS + 10));
    }
    fx.run(move |fs| Box::pin(async move { fs.fsync(ino, None).await })).unwrap();
    let synced = model.clone();
    for (i, page) in [1u64, 5, 6, 30].into_iter().enumerate() {
        overwrite(&mut fx, &mut model, page * 4096, 1, 40 + i as u64, Time(5 * MS + 10));
    }
    fx.power_cut(nvme::crash::PowerCutMode::Random, 4);
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
    let got = fx.read(ino, 0, model.len() + 10);
    assert_eq!(got.len(), model.len());
    for (i, ((g, old), new)) in got.chunks(512).zip(synced.chunks(512)).zip(model.chunks(512)).enumerate() {
        assert!(g == old || g == new, "sector {i} after a power cut is neither what was synced nor what was written");
    }
}

/// Direct overwrites in place, racing copy-on-write writes of the same pages
/// (which free the pages the overwrites look up) and writes of another file
/// (which take pages as they come free): every page of the first file ends
/// as one of the writes to it, the other file exactly as written, and the
/// metadata and the store whole. An overwrite that landed on a page after
/// it went to the other file would show there. (Pages come free only once
/// the command that let them go is durable, so that takes a slow device
/// write; that no page is reused while a read or an overwrite that looked
/// it up is in flight is `frees_wait_for_reads_that_began_before_them`.)
#[test]
fn overwrites_in_place_racing_copy_on_write_and_other_files_stay_in_their_pages() {
    use std::collections::HashSet;
    const PAGES: u64 = 16;
    let mut fx = Fx::new(64);
    let (a, b) = (fx.create("a"), fx.create("b"));
    let first = pattern(1, (PAGES * 4096) as usize);
    fx.write(a, 0, first.clone()).unwrap();
    let mut seen: Vec<HashSet<Vec<u8>>> = first.chunks(4096).map(|c| HashSet::from([c.to_vec()])).collect();
    let direct: Vec<(u64, Vec<u8>)> = (0..300).map(|i| (i % PAGES, pattern(1000 + i, 4096))).collect();
    let cow: Vec<(u64, Vec<u8>)> = (0..100).map(|i| ((i * 7) % PAGES, pattern(5000 + i, 4096))).collect();
    let other: Vec<(u64, Vec<u8>)> = (0..100).map(|i| ((i * 3) % 40 * 4096, pattern(9000 + i, 8192))).collect();
    for (p, d) in direct.iter().chain(&cow) {
        seen[*p as usize].insert(d.clone());
    }
    let mut model_b = Vec::new();
    for (offset, d) in &other {
        model_write(&mut model_b, *offset, d);
    }
    let in_place = fx.run(move |fs| {
        Box::pin(async move {
            let f = fs.clone();
            let overwrites = tokio::spawn(async move {
                let mut in_place = 0;
                for (i, (p, d)) in direct.into_iter().enumerate() {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    // Time stays in one span: nothing but the first needs a command.
                    let now = Time(9 + i as i64);
                    match f.try_write_now(a, p * 4096, &d, now, true, move |r| tx.send(r).unwrap()) {
                        Ok(()) => {
                            rx.await.unwrap().unwrap();
                            in_place += 1;
                        }
                        Err(_) => {
                            f.write(a, p * 4096, &d, now).await.unwrap();
                        }
                    }
                }
                in_place
            });
            let f = fs.clone();
            let rewrites = tokio::spawn(async move {
                for (p, d) in cow {
                    f.write(a, p * 4096, &d, Time(9)).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
            let f = fs.clone();
            let others = tokio::spawn(async move {
                for (offset, d) in other {
                    f.write(b, offset, &d, Time(9)).await.unwrap();
                }
            });
            let (in_place, _, _) = tokio::try_join!(overwrites, rewrites, others).unwrap();
            in_place
        })
    });
    assert!(in_place > 0, "no overwrite went in place");
    let got = fx.read(a, 0, (PAGES * 4096) as usize);
    for (p, page) in got.chunks(4096).enumerate() {
        assert!(seen[p].contains(page), "page {p} of a holds bytes nobody wrote there");
    }
    assert!(fx.read(b, 0, model_b.len()) == model_b, "the other file's bytes changed");
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
    let s = fx.store.clone();
    assert_eq!(fx.h.run(async move { s.check().await }).unwrap(), Vec::<String>::new());
}

/// A write that would have to wait (part of a unit, whose other bytes must
/// be read) is not staged without waiting, and nothing of it happens; bad
/// targets are refused at once.
#[test]
fn writes_that_would_wait_are_left_to_a_task() {
    let mut fx = Fx::on(64, true, UNIT);
    let ino = fx.create("f");
    assert!(fx.try_now(ino, 100, &[1; 10], false).is_none(), "part of a unit");
    assert!(!fx.fs.writing(ino), "nothing went behind");
    let lock = fx.run(move |fs| Box::pin(async move { fs.write(ino, 0, &[2; 4096], Time(9)).await })).map(drop);
    lock.unwrap();
    assert_eq!(fx.try_now(ROOT, 0, &[1; 4096], false), Some(Err(Errno::EISDIR)));
    assert_eq!(fx.try_now(ino, u64::MAX - 4095, &[1; 4096], false), Some(Err(Errno::EFBIG)));
    assert_eq!(fx.try_now(ino, 4096, &[3; 8192], false), Some(Ok(())));
    let mut want = vec![2; 4096];
    want.extend([3; 8192]);
    assert_eq!(fx.read(ino, 0, 20000), want);
    // The same for O_DIRECT writes: the answer is handed back untouched.
    let (tx, mut rx) = tokio::sync::oneshot::channel::<Result<(), Errno>>();
    let back = fx.fs.try_write_now(ino, 100, &[1; 10], Time(9), true, move |r| tx.send(r).unwrap());
    assert!(back.is_err() && rx.try_recv().is_err(), "part of a unit: nothing done, nothing answered");
    assert_eq!(fx.try_now(ROOT, 0, &[1; 4096], true), Some(Err(Errno::EISDIR)));
    assert_eq!(fx.try_now(ino, u64::MAX - 4095, &[1; 4096], true), Some(Err(Errno::EFBIG)));
    assert_eq!(fx.try_now(ino, 12288, &[4; 4096], true), Some(Ok(())));
    want.extend([4; 4096]);
    assert_eq!(fx.read(ino, 0, 20000), want);
}

/// A read answered by the reactor (every read of these tests is made
/// that way too and compared, `Fx::read`) is left to a task while the
/// file has writes behind, or is reduced; a directory is EISDIR.
#[test]
fn reads_answered_by_the_reactor_leave_files_with_writes_behind_to_a_task() {
    let mut fx = Fx::on(64, true, UNIT);
    let ino = fx.create("f");
    assert_eq!(fx.read_now(ROOT, 0, 10), Some(Err(Errno::EISDIR)));
    assert_eq!(fx.read_now(ino, 0, 10), Some(Ok(Vec::new())), "an empty file");
    // Staged from this thread: its device write waits for the reactor,
    // which only runs inside `fx.run`.
    assert_eq!(fx.try_now(ino, 0, &[7; 8192], false), Some(Ok(())));
    assert!(fx.fs.writing(ino));
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    assert!(fx.fs.try_read_now(ino, 0, 10, move |_| tx.send(()).unwrap()).is_err(), "a file with writes behind");
    assert!(rx.try_recv().is_err(), "and nothing was answered");
    assert_eq!(fx.read(ino, 4000, 200), vec![7; 200]);
    assert_eq!(fx.read_now(ino, 8000, 1000), Some(Ok(vec![7; 192])), "up to the end");
    let reduced = fx.create("g");
    fx.set_policy(reduced, "lz4").unwrap();
    assert_eq!(fx.read_now(reduced, 0, 10), None, "a reduced file");
}

/// A device error met by a write after its reply is returned, as the
/// kernel's errseq returns writeback errors, once to each handle of the
/// file that was open when it happened (by its next flush, which is a
/// close, or fsync), and to one opened before anyone was told of it, not
/// to one opened after; the file keeps what it held before.
#[test]
fn a_write_behind_that_fails_after_its_reply_is_reported_once_to_each_open_handle() {
    use nvme::error_bdev::{InjectConfig, InjectIoType, InjectKind};
    let mut fx = Fx::with_error_bdev(64);
    let ino = fx.create("f");
    let before = pattern(1, 8 * 4096);
    fx.write(ino, 0, before.clone()).unwrap();
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    let inject = |kind, num| InjectConfig {
        name: "EE_M0".into(),
        io_type: InjectIoType::Write,
        error_type: kind,
        num,
        skip: 0,
        torn_blocks: None,
    };
    let (a, b) = (fx.fs.opened(ino), fx.fs.opened(ino));
    nvme::error_bdev::inject(&fx.h.registry, &inject(InjectKind::Failure, 1)).unwrap();
    // The pages are backed already: the next device write is this one's.
    let new = pattern(2, 4096);
    let data = new.clone();
    fx.run(move |fs| Box::pin(async move { fs.write_behind(ino, 4096, &data, Time(9)).await }))
        .expect("the write is answered before its device write");
    let flush = |fx: &mut Fx, fh| fx.run(move |fs| Box::pin(async move { fs.flush(ino, fh).await }));
    assert_eq!(flush(&mut fx, a), Err(Errno::EIO));
    assert_eq!(flush(&mut fx, a), Ok(()), "told once");
    let c = fx.fs.opened(ino);
    assert_eq!(fx.fs.write_error(b), Err(Errno::EIO), "and every handle that was open");
    assert_eq!(fx.fs.write_error(b), Ok(()));
    assert_eq!(fx.fs.write_error(c), Ok(()), "not one opened after it was told");
    // A close that does not wait (flush-behind) reports it too, once
    // the write has met it; a handle opened before anyone was told of it
    // hears of it as well.
    nvme::error_bdev::inject(&fx.h.registry, &inject(InjectKind::Failure, 1)).unwrap();
    let data = new.clone();
    fx.run(move |fs| Box::pin(async move { fs.write_behind(ino, 4096, &data, Time(9)).await })).unwrap();
    fx.run(move |fs| Box::pin(async move { fs.settle(ino).await }));
    let d = fx.fs.opened(ino);
    assert_eq!(fx.fs.write_error(c), Err(Errno::EIO));
    assert_eq!(fx.fs.write_error(c), Ok(()), "told once");
    assert_eq!(fx.fs.write_error(d), Err(Errno::EIO), "opened before anyone was told");
    let fsync = |fx: &mut Fx, fh| fx.run(move |fs| Box::pin(async move { fs.fsync(ino, Some(fh)).await }));
    assert_eq!(fsync(&mut fx, a), Err(Errno::EIO), "fsync tells too");
    assert_eq!(fsync(&mut fx, a), Ok(()));
    assert_eq!(fx.read(ino, 0, before.len()), before, "the failed write changed the file");
    // An O_DIRECT write's answer carries its device error; nothing is
    // left for the handles.
    nvme::error_bdev::inject(&fx.h.registry, &inject(InjectKind::Failure, 1)).unwrap();
    assert_eq!(fx.try_now(ino, 4096, &new, true), Some(Err(Errno::EIO)));
    assert_eq!(flush(&mut fx, b), Err(Errno::EIO), "b was not told of the second error yet");
    for fh in [a, b, c, d] {
        assert_eq!(flush(&mut fx, fh), Ok(()), "handle {fh}: the answer reported it");
    }
    assert_eq!(fx.read(ino, 0, before.len()), before, "the failed write changed the file");
    let data = new.clone();
    fx.run(move |fs| Box::pin(async move { fs.write_behind(ino, 4096, &data, Time(9)).await })).unwrap();
    fx.run(move |fs| Box::pin(async move { fs.fsync(ino, Some(b)).await })).unwrap();
    assert_eq!(fx.read(ino, 4096, 4096), new);
    for fh in [a, b, c, d] {
        fx.run(move |fs| Box::pin(async move { fs.released(ino, fh).await })).unwrap();
    }
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
}

#[test]
fn an_unlinked_file_lives_while_open_and_its_space_comes_back_after() {
    let mut fx = Fx::new(64);
    let ino = fx.create("f");
    let (_, free_before) = fx.fs.space();
    fx.write(ino, 0, vec![5; 4 * CHUNK as usize]).unwrap();
    let fh = fx.fs.opened(ino);
    fx.apply(Cmd::Unlink { parent: ROOT, name: b"f".to_vec(), now: Time(20) }).unwrap();
    assert_eq!(fx.read(ino, 0, 10), vec![5; 10], "still readable through the open handle");
    assert!(fx.fs.space().1 < free_before);
    fx.run(move |fs| Box::pin(async move { fs.released(ino, fh).await })).unwrap();
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    assert_eq!(fx.fs.space().1, free_before, "the last close frees its data, once that is durable");
    let gone = fx.run(move |fs| Box::pin(async move { fs.meta().read(|s| s.getattr(ino).err()) }));
    assert_eq!(gone, Some(Errno::ENOENT));
}

#[test]
fn unlinks_answered_ahead_read_as_done_at_once_and_are_durable_after_sync() {
    let mut fx = Fx::on(64, true, UNIT);
    let entry = |r: Reply| match r {
        Reply::Entry(a) => a.ino,
        r => panic!("{r:?}"),
    };
    let d = entry(fx.apply(Cmd::Mkdir { parent: ROOT, name: b"d".to_vec(), perm: 0o755, by: BY }).unwrap());
    let files = 200;
    let mut inos = Vec::new();
    for i in 0..files {
        let name = format!("f{i}").into_bytes();
        let ino = entry(
            fx.apply(Cmd::Mknod { parent: d, name, kind: FileKind::File, perm: 0o644, rdev: 0, by: BY }).unwrap(),
        );
        fx.write(ino, 0, vec![i as u8; UNIT as usize]).unwrap();
        inos.push(ino);
    }
    // f5 stays open; f7 keeps a second name.
    let (open, linked) = (inos[5], inos[7]);
    fx.apply(Cmd::Link { ino: linked, parent: ROOT, name: b"h".to_vec(), now: Time(30) }).unwrap();
    let fh = fx.fs.opened(open);
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    // Pages the pool holds for data (the log takes store space too).
    let held = |fx: &Fx| {
        let (total, free) = fx.fs.space();
        total - free
    };
    let held_before = held(&fx);

    let mut ahead = 0;
    for (i, &ino) in inos.iter().enumerate() {
        let (name, now) = (format!("f{i}").into_bytes(), Time(100 + i as i64));
        if fx.fs.unlink_ahead(d, &name, now) {
            ahead += 1;
        } else {
            fx.apply(Cmd::Unlink { parent: d, name: name.clone(), now }).unwrap();
        }
        // Answered (or applied): every reader sees it done, at once.
        fx.fs.meta().read(|s| {
            assert_eq!(s.lookup(d, &name).err(), Some(Errno::ENOENT), "f{i} is still found");
            assert!(s.readdir(d, 0, usize::MAX).unwrap().iter().all(|e| e.name != name), "f{i} is still listed");
            let dir = s.getattr(d).unwrap();
            assert!(dir.mtime >= now && dir.ctime >= now, "f{i}: the directory's times are {dir:?}");
            if ino == open || ino == linked {
                let a = s.getattr(ino).unwrap();
                assert_eq!(a.nlink, u32::from(ino == linked), "f{i}'s link count");
                assert!(a.ctime >= now, "f{i}'s change time");
            }
        });
    }
    assert!(ahead > 0, "no unlink was answered ahead");
    // What cannot be: a directory, a name already gone (the usual way
    // then applies after the unlinks ahead and says why).
    assert!(!fx.fs.unlink_ahead(ROOT, b"d", Time(400)));
    assert!(!fx.fs.unlink_ahead(d, b"f0", Time(400)));
    assert_eq!(fx.apply(Cmd::Unlink { parent: d, name: b"f0".to_vec(), now: Time(400) }).err(), Some(Errno::ENOENT));

    // A sync waits for all of them and the frees that follow: the state
    // itself has them, and the space of the files nobody holds is back.
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    fx.fs
        .meta()
        .read(|s| {
            assert_eq!(s.applied().readdir(d, 0, usize::MAX).unwrap().len(), 2, "only . and .. are left");
            s.check()
        })
        .unwrap();
    assert_eq!(held(&fx), held_before - (files as u64 - 2), "all but the open and the linked file are freed");
    assert_eq!(fx.read(open, 0, 8), vec![5; 8], "the open file still reads");
    fx.run(move |fs| Box::pin(async move { fs.released(open, fh).await })).unwrap();

    // Nothing of it is lost to a power cut after the sync.
    fx.power_cut(nvme::crash::PowerCutMode::Drop, 21);
    fx.fs
        .meta()
        .read(|s| {
            assert_eq!(s.readdir(d, 0, usize::MAX).unwrap().len(), 2);
            assert_eq!(s.lookup(ROOT, b"h").map(|a| (a.ino, a.nlink)), Ok((linked, 1)));
            assert_eq!(s.getattr(open).err(), Some(Errno::ENOENT), "the open file's orphan is reclaimed");
            s.check()
        })
        .unwrap();
    assert_eq!(fx.read(linked, 0, 8), vec![7; 8]);
}

#[test]
fn creates_answered_ahead_read_as_done_at_once_and_are_durable_after_sync() {
    let mut fx = Fx::on(64, true, UNIT);
    let entry = |r: Reply| match r {
        Reply::Entry(a) => a,
        r => panic!("{r:?}"),
    };
    // A set-group-id directory of group 77: its new files take that group.
    let d = entry(fx.apply(Cmd::Mkdir { parent: ROOT, name: b"d".to_vec(), perm: 0o755, by: BY }).unwrap()).ino;
    let set = SetAttr { perm: Some(0o2777), gid: Some(77), ..Default::default() };
    fx.apply(Cmd::SetAttr { ino: d, set, now: Time(6) }).unwrap();
    let mut told = Vec::new();
    let mut ahead = 0;
    for i in 0..200u8 {
        let name = format!("f{i}").into_bytes();
        let by = Creator { uid: 5, gid: 6, now: Time(100 + i64::from(i)) };
        let a = match fx.fs.create_ahead(d, &name, 0o640, by) {
            Some(a) => {
                ahead += 1;
                a
            }
            None => {
                let cmd = Cmd::Mknod { parent: d, name: name.clone(), kind: FileKind::File, perm: 0o640, rdev: 0, by };
                entry(fx.apply(cmd).unwrap())
            }
        };
        assert_eq!((a.uid, a.gid, a.perm, a.nlink, a.size), (5, 77, 0o640, 1, 0), "f{i}: {a:?}");
        // Answered: every reader sees the file, at once.
        fx.fs.meta().read(|s| {
            assert_eq!(s.lookup(d, &name).as_ref(), Ok(&a), "f{i} is not found as its creator was told");
            assert_eq!(s.getattr(a.ino).as_ref(), Ok(&a));
            assert!(s.readdir(d, 0, usize::MAX).unwrap().iter().any(|e| e.name == name && e.ino == a.ino));
            let dir = s.getattr(d).unwrap();
            assert!(dir.mtime >= by.now && dir.ctime >= by.now, "f{i}: the directory's times are {dir:?}");
        });
        // Some are written at once: the write waits for the create.
        if i % 40 == 3 {
            fx.fs.created(a.ino);
            fx.write(a.ino, 0, vec![i; UNIT as usize]).unwrap();
        }
        told.push((name, a));
    }
    assert!(ahead > 0, "no create was answered ahead");
    // What cannot be: a name that is taken (the usual way then says so,
    // after the creates ahead), a directory that is not there.
    assert!(fx.fs.create_ahead(d, b"f0", 0o640, BY).is_none());
    let cmd = Cmd::Mknod { parent: d, name: b"f0".to_vec(), kind: FileKind::File, perm: 0o640, rdev: 0, by: BY };
    assert_eq!(fx.apply(cmd).err(), Some(Errno::EEXIST));
    assert!(fx.fs.create_ahead(999, b"x", 0o640, BY).is_none());

    // A sync waits for all of them: the state itself has each file as its
    // creator was told.
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    let check = |fx: &Fx| {
        fx.fs
            .meta()
            .read(|s| {
                let listed = s.applied().readdir(d, 0, usize::MAX).unwrap();
                assert_eq!(listed.len(), told.len() + 2);
                for (name, a) in &told {
                    let now = s.applied().lookup(d, name).unwrap();
                    assert_eq!((now.ino, now.generation, now.gid, now.btime), (a.ino, a.generation, a.gid, a.btime));
                }
                s.check()
            })
            .unwrap();
    };
    check(&fx);
    // Nothing of it is lost to a power cut after the sync.
    fx.power_cut(nvme::crash::PowerCutMode::Drop, 22);
    check(&fx);
    for (i, (_, a)) in told.iter().enumerate().filter(|(i, _)| i % 40 == 3) {
        assert_eq!(fx.read(a.ino, 0, 8), vec![i as u8; 8]);
    }
}

#[test]
fn a_full_pool_says_enospc_and_deleting_makes_room() {
    // 8 MiB: a few MiB of data pool once the store's metadata is placed.
    let mut fx = Fx::new(8);
    let a = fx.create("a");
    let block = vec![1u8; CHUNK as usize * 8];
    // What statfs says is free is what data can take: not the store's
    // metadata, nor its reserve.
    let free = fx.fs.space().1 * 4096;
    let mut written = 0u64;
    let err = loop {
        match fx.write(a, written, block.clone()) {
            Ok(_) => written += block.len() as u64,
            Err(e) => break e,
        }
        assert!(written <= free, "{written} bytes written of the {free} said to be free");
    };
    assert_eq!(err, Errno::ENOSPC);
    assert!(written > 0);
    let (total, left) = fx.fs.space();
    assert!(left * 4096 < block.len() as u64, "ENOSPC with {left} pages said to be free");
    assert!(total * 4096 >= written);
    // What was written before is intact; the failed write left nothing behind.
    assert_eq!(fx.read(a, 0, block.len()), block);
    fx.apply(Cmd::Unlink { parent: ROOT, name: b"a".to_vec(), now: Time(30) }).unwrap();
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    assert!(fx.fs.space().1 * 4096 >= written, "deleting gave the space back");
    let b = fx.create("b");
    fx.write(b, 0, block.clone()).unwrap();
    assert_eq!(fx.read(b, 0, block.len()), block);
}

#[test]
fn a_stream_of_writes_backs_the_pool_ahead_in_few_journal_records() {
    let mut fx = Fx::new(64);
    let a = fx.create("a");
    let s = fx.store.clone();
    let before = fx.h.run(async move { s.stats().await }).unwrap().ops;
    // 4 MiB in 64 KiB writes (one store cluster each), one at a time.
    let data = pattern(3, 4 << 20);
    for (i, piece) in data.chunks(64 << 10).enumerate() {
        fx.write(a, i as u64 * (64 << 10), piece.to_vec()).unwrap();
    }
    let s = fx.store.clone();
    let after = fx.h.run(async move { s.stats().await }).unwrap().ops;
    let (allocations, records) = (after.allocations - before.allocations, after.records - before.records);
    assert!(allocations > 64, "64 clusters written and more backed ahead: {allocations}");
    assert!(records <= 16, "{allocations} clusters in {records} journal records");
    assert_eq!(fx.read(a, 0, data.len()), data);
}

#[test]
fn fallocate_punches_holes_that_free_space_and_refuses_what_it_cannot_do() {
    let mut fx = Fx::new(16);
    let ino = fx.create("f");
    fx.write(ino, 0, vec![7; 6 * CHUNK as usize]).unwrap();
    let (_, free_before) = fx.fs.space();
    // Chunks 1..5 wholly inside, half of chunk 0 and of chunk 5 at the edges.
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(fx.fallocate(ino, CHUNK / 2, 5 * CHUNK, punch).unwrap(), 6 * CHUNK);
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    assert!(fx.fs.space().1 >= free_before + 4 * CHUNK / 4096, "four whole chunks are free again");
    let data = fx.read(ino, 0, 6 * CHUNK as usize);
    assert!(data[..CHUNK as usize / 2].iter().all(|&b| b == 7));
    assert!(data[CHUNK as usize / 2..11 * CHUNK as usize / 2].iter().all(|&b| b == 0));
    assert!(data[11 * CHUNK as usize / 2..].iter().all(|&b| b == 7));

    // Modes we do not do, punching without KEEP_SIZE, an empty range, a
    // size past the largest file, more than the device holds.
    assert_eq!(fx.fallocate(ino, 0, 1, libc::FALLOC_FL_COLLAPSE_RANGE), Err(Errno::EOPNOTSUPP));
    assert_eq!(fx.fallocate(ino, 0, 1, libc::FALLOC_FL_PUNCH_HOLE), Err(Errno::EOPNOTSUPP));
    assert_eq!(fx.fallocate(ino, 0, 0, 0), Err(Errno::EINVAL));
    assert_eq!(fx.fallocate(ino, u64::MAX / 2, u64::MAX / 2, 0), Err(Errno::EFBIG));
    assert_eq!(fx.fallocate(ino, 0, 1 << 30, 0), Err(Errno::ENOSPC));
    assert_eq!(fx.fallocate(ROOT, 0, 1, 0), Err(Errno::EISDIR));
    assert_eq!(fx.read(ino, 0, 16).len(), 16, "a refused fallocate changes nothing");
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
}

#[test]
fn a_store_full_of_metadata_says_enospc_and_unlinking_everything_still_works() {
    // Only metadata: every create is a record of the log, and the log
    // fills the store. The unlinks after must not run out of room.
    let mut fx = Fx::new(8);
    let mut made = 0u32;
    let err = loop {
        let cmd = Cmd::Mknod {
            parent: ROOT,
            name: format!("f{made}").into(),
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            by: BY,
        };
        match fx.apply(cmd) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 100_000, "an 8 MiB store took 100,000 creates");
    };
    assert_eq!(err, Errno::ENOSPC);
    for i in 0..made {
        fx.apply(Cmd::Unlink { parent: ROOT, name: format!("f{i}").into(), now: Time(30) })
            .unwrap_or_else(|e| panic!("unlink {i} of {made}: {e:?}"));
    }
    // Room again, once the snapshot has let the log shrink.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let ino = loop {
        match fx.apply(Cmd::Mknod {
            parent: ROOT,
            name: b"again".to_vec(),
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            by: BY,
        }) {
            Ok(Reply::Entry(a)) => break a.ino,
            Ok(r) => panic!("{r:?}"),
            Err(e) => {
                assert_eq!(e, Errno::ENOSPC);
                assert!(std::time::Instant::now() < deadline, "no room 30 s after deleting everything");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    };
    // The create may take the first room back; the write's pages follow.
    while let Err(e) = fx.write(ino, 0, vec![3; 4096]) {
        assert_eq!(e, Errno::ENOSPC);
        assert!(std::time::Instant::now() < deadline, "no room for 4 KiB 30 s after deleting everything");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
}

/// A random workload of file-system operations, a power cut (unflushed
/// writes dropped, kept or torn at random), a reload: the metadata must be
/// the state after some prefix of the operations at least as long as the
/// last `sync`, structurally sound, and every file must hold exactly the
/// bytes it had after that prefix.
fn power_cut_round(seed: u64, policy: Option<(&str, KeySource)>) {
    use nvme::crash::PowerCutMode;
    let mut fx = Fx::keyed(32, true, UNIT, policy.as_ref().map(|(_, k)| k.clone()));
    if let Some((p, _)) = &policy {
        fx.set_policy(ROOT, p).unwrap();
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    // After each operation: the state, and the bytes of each file.
    let mut files: std::collections::BTreeMap<Ino, Vec<u8>> = Default::default();
    let mut history = vec![(fx.fs.meta().read(|s| s.applied().clone()), files.clone())];
    let mut synced = 0;
    let mut names: Vec<(Vec<u8>, Ino)> = Vec::new();
    for step in 0..rng.usize(20..120) {
        let t = Time(100 + step as i64);
        match rng.u8(..10) {
            0..=2 => {
                let name = format!("f{step}").into_bytes();
                let cmd =
                    Cmd::Mknod { parent: ROOT, name: name.clone(), kind: FileKind::File, perm: 0o644, rdev: 0, by: BY };
                let Reply::Entry(a) = fx.apply(cmd).unwrap() else { panic!() };
                names.push((name, a.ino));
                files.insert(a.ino, Vec::new());
            }
            3..=5 if !names.is_empty() => {
                let ino = names[rng.usize(..names.len())].1;
                let (offset, data) =
                    (rng.u64(..4 * CHUNK), pattern(seed * 1000 + step as u64, rng.usize(1..2 * CHUNK as usize)));
                fx.run({
                    let data = data.clone();
                    move |fs| Box::pin(async move { fs.write(ino, offset, &data, t).await.map(|_| ()) })
                })
                .unwrap();
                model_write(files.get_mut(&ino).unwrap(), offset, &data);
            }
            6 if !names.is_empty() => {
                let (name, ino) = names.swap_remove(rng.usize(..names.len()));
                fx.apply(Cmd::Unlink { parent: ROOT, name, now: t }).unwrap();
                files.remove(&ino);
            }
            7 if !names.is_empty() => {
                let i = rng.usize(..names.len());
                let new = format!("r{step}").into_bytes();
                let cmd = Cmd::Rename {
                    parent: ROOT,
                    name: names[i].0.clone(),
                    new_parent: ROOT,
                    new_name: new.clone(),
                    mode: blobfs::fs::RenameMode::Replace,
                    now: t,
                };
                fx.apply(cmd).unwrap();
                names[i].0 = new;
            }
            8 if !names.is_empty() => {
                let ino = names[rng.usize(..names.len())].1;
                let size = rng.u64(..4 * CHUNK);
                fx.truncate(ino, size);
                files.get_mut(&ino).unwrap().resize(size as usize, 0);
            }
            9 if policy.is_some() && rng.bool() => {
                fx.run(|fs| Box::pin(async move { fs.gc_pass().await })).unwrap();
            }
            _ => {
                fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
                synced = history.len() - 1;
                continue;
            }
        }
        history.push((fx.fs.meta().read(|s| s.applied().clone()), files.clone()));
    }

    let mode = [PowerCutMode::Drop, PowerCutMode::Keep, PowerCutMode::Random][rng.usize(0..3)];
    fx.power_cut(mode, seed);

    let state = fx.fs.meta().read(|s| s.applied().clone());
    state.check().unwrap_or_else(|e| panic!("seed {seed}: the recovered state is unsound: {e}"));
    let k = (synced..history.len())
        .rev()
        .find(|&k| history[k].0 == state)
        .unwrap_or_else(|| panic!("seed {seed}: the recovered state is no prefix from op {synced} on ({mode:?})"));
    for (&ino, want) in &history[k].1 {
        let got = fx.read(ino, 0, want.len() + 10);
        assert_eq!(got.len(), want.len(), "seed {seed}: size of inode {ino}");
        if got != *want {
            let first = got.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap();
            let last = got.iter().zip(want.iter()).rposition(|(a, b)| a != b).unwrap();
            let extents: Vec<_> = state.extents(ino, 0).unwrap().collect();
            panic!(
                "seed {seed}: the bytes of inode {ino} after {k} ops of {} ({mode:?}), synced {synced}: differ in {first}..={last} of {}; got {:?} want {:?}; extents {extents:?}",
                history.len() - 1,
                want.len(),
                &got[first..first + 8.min(want.len() - first)],
                &want[first..first + 8.min(want.len() - first)]
            );
        }
    }
    let s = fx.store.clone();
    let problems = fx.h.run(async move { s.check().await }).unwrap();
    assert!(problems.is_empty(), "seed {seed}: store check: {problems:?}");
    if policy.is_some() {
        fx.audit_clean(&format!("seed {seed}"));
    }
    // And it goes on working.
    let ino = fx.create("after");
    fx.write(ino, 0, vec![1; 3 * CHUNK as usize]).unwrap();
}

#[test]
fn power_cuts_leave_a_consistent_file_system_holding_at_least_what_was_synced() {
    let rounds: u64 = std::env::var("CLAUDEFS_FS_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    for seed in 1..=rounds {
        power_cut_round(seed, None);
    }
}

/// The same with reduced files (content-defined chunks, compression,
/// encryption) and garbage collection passes among the operations; the
/// audit is clean after every recovery.
#[test]
fn power_cuts_during_reduced_writes_and_garbage_collection_lose_nothing() {
    let rounds: u64 = std::env::var("CLAUDEFS_FS_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let (_dir, key) = key_file(5);
    for seed in 1..=rounds {
        let policy = if seed % 2 == 0 { "cdc:2k:8k:32k,lz4" } else { "fixed:8k,zstd:1,enc" };
        power_cut_round(seed, Some((policy, key.clone())));
    }
}

/// The same bytes written to two files (in different write sizes) are
/// stored once; overwriting part of one or deleting it leaves the other
/// whole, and the space of what nothing names any more comes back.
#[test]
fn identical_data_is_stored_once_and_files_stay_independent() {
    let mut fx = Fx::new(64);
    fx.set_policy(ROOT, "cdc:4k:16k:64k,lz4").unwrap();
    let data = pattern(11, 1 << 20);
    let (a, b) = (fx.create("a"), fx.create("b"));
    for (i, piece) in data.chunks(256 << 10).enumerate() {
        fx.write(a, (i * (256 << 10)) as u64, piece.to_vec()).unwrap();
    }
    fx.write(b, 0, data.clone()).unwrap();
    let s = fx.fs.reduce_stats();
    assert_eq!(s.totals.logical_bytes, 2 << 20);
    assert!(s.totals.unique_bytes <= (1 << 20) + (1 << 17), "stored twice? {s:?}");
    assert!(s.dedupe_ratio > 1.8, "{s:?}");
    // Overwrite the middle of a chunk of one file.
    let mut model = data.clone();
    let patch = pattern(12, 10_000);
    model_write(&mut model, 300_000, &patch);
    fx.write(a, 300_000, patch).unwrap();
    assert_eq!(fx.read(a, 0, 2 << 20), model);
    assert_eq!(fx.read(b, 0, 2 << 20), data, "the other file changed");
    let held = fx.fs.reduce_stats().totals.segment_bytes;
    fx.apply(Cmd::Unlink { parent: ROOT, name: b"a".to_vec(), now: Time(20) }).unwrap();
    fx.run(|fs| Box::pin(async move { fs.collect_garbage().await })).unwrap();
    assert_eq!(fx.read(b, 0, 2 << 20), data, "deleting the other file changed this one");
    let s = fx.fs.reduce_stats();
    assert_eq!(s.totals.logical_bytes, 1 << 20);
    assert!(s.totals.segment_bytes < held, "nothing came back: {held} then {s:?}");
    fx.audit_clean("after the delete");
    // The state with its index survives the snapshot encoding (and is the
    // seed of the `meta_state` fuzz target).
    let state = fx.fs.meta().read(|s| s.applied().clone());
    let bytes = blobfs::fs::raft::encode_state(&state);
    assert_eq!(blobfs::fs::raft::decode_state(&bytes).unwrap(), state);
    if std::env::var_os("BLOBFS_WRITE_FUZZ_SEEDS").is_some() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/meta_state");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("reduced_files"), &bytes).unwrap();
    }
}

/// A flipped byte in a stored frame: reading the file says EIO (never other
/// bytes), the audit names the chunk and the file, other files still read.
#[test]
fn a_damaged_frame_reads_as_eio_and_the_audit_names_its_file() {
    let (_dir, key) = key_file(3);
    for policy in ["cdc:2k:8k:32k,lz4", "fixed:8k,none,enc"] {
        let mut fx = Fx::keyed(32, false, UNIT, Some(key.clone()));
        fx.set_policy(ROOT, policy).unwrap();
        let (f, g) = (fx.create("f"), fx.create("g"));
        fx.write(f, 0, pattern(5, 100_000)).unwrap();
        fx.write(g, 0, pattern(6, 100_000)).unwrap();
        fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
        // The first view of f: its chunk's frame, a byte past its header.
        let (run, at) = fx.fs.meta().read(|s| {
            let (_, v) = s.views(f, 0, 1).unwrap()[0];
            let c = s.reduce_index().get(&v.hash).unwrap();
            (s.reduce_index().segment(c.segment).unwrap().run, u64::from(c.offset) + 64 + 10)
        });
        let store = fx.store.clone();
        let blob = fx.h.run(async move { store.open_blob(run.blob).await }).unwrap();
        let ch = fx.h.channel(&fx.store, 0);
        let page = run.page + at / 4096;
        let mut bytes = fx.h.read(&ch, blob.shared(), page, 1).unwrap();
        bytes[(at % 4096) as usize] ^= 0x40;
        fx.h.write(&ch, blob.shared(), page, &bytes).unwrap();
        let got = fx.run(move |fs| Box::pin(async move { fs.read(f, 0, 100_000).await }));
        assert_eq!(got, Err(Errno::EIO), "{policy}");
        assert_eq!(fx.read(g, 0, 100_000), pattern(6, 100_000), "{policy}: the other file");
        let report = fx.run(|fs| Box::pin(async move { fs.reduce_audit(false).await })).unwrap();
        assert_eq!(report.corrupt_chunks.len(), 1, "{policy}: {report:?}");
        assert_eq!(report.corrupt_chunks[0].3, vec![f], "{policy}: {report:?}");
        let problem = &report.corrupt_chunks[0].2;
        let want = if policy.contains("enc") { "authentication failed" } else { "checksum mismatch" };
        assert!(problem.contains(want), "{policy}: {problem}");
        let s = fx.store.clone();
        fx.h.run(async move { blob.close().await }).unwrap();
        drop(s);
    }
}

/// The first key a file system is given is the one it keeps: another key,
/// or none, is refused at open with an error saying so; the right one reads
/// the data back.
#[test]
fn a_wrong_or_missing_master_key_refuses_to_open() {
    let ((_d1, right), (_d2, wrong)) = (key_file(1), key_file(2));
    let mut fx = Fx::keyed(32, false, UNIT, Some(right.clone()));
    fx.set_policy(ROOT, "lz4,enc").unwrap();
    let f = fx.create("f");
    fx.write(f, 0, pattern(9, 50_000)).unwrap();
    fx.run(|fs| Box::pin(async move { fs.sync().await })).unwrap();
    let store = fx.stop_and_reload();
    let err = Fx::open_fs(&mut fx.h, &fx.rt, &store, UNIT, Some(wrong)).err().expect("a wrong key opened it");
    assert!(err.to_string().contains("not the one this file system's encrypted data was written with"), "{err}");
    let err = Fx::open_fs(&mut fx.h, &fx.rt, &store, UNIT, None).err().expect("no key opened it");
    assert!(err.to_string().contains("holds a master key"), "{err}");
    fx.fs = Fx::open_fs(&mut fx.h, &fx.rt, &store, UNIT, Some(right)).unwrap();
    fx.store = store;
    assert_eq!(fx.read(f, 0, 60_000), pattern(9, 50_000));
    // A passphrase on a file system made with a key file is another key.
    let store = fx.stop_and_reload();
    let err = Fx::open_fs(&mut fx.h, &fx.rt, &store, UNIT, Some(KeySource::Passphrase(b"secret".to_vec())))
        .err()
        .expect("a passphrase opened it");
    assert!(err.to_string().contains("not the one"), "{err}");
}

/// The policy xattr: checked, stored in canonical form, passed on to new
/// files and directories, refused where it cannot apply.
#[test]
fn the_reduce_policy_xattr_is_checked_inherited_and_read_back() {
    let mut fx = Fx::new(32);
    let plain = fx.create("plain");
    fx.write(plain, 0, vec![1; 5000]).unwrap();
    assert_eq!(fx.set_policy(ROOT, "lz4,gzip").err(), Some(Errno::EINVAL));
    assert_eq!(fx.set_policy(ROOT, "lz4,enc").err(), Some(Errno(libc::ENOKEY)), "encryption without a key");
    assert_eq!(fx.set_policy(plain, "lz4").err(), Some(Errno::EBUSY), "a file with data");
    fx.set_policy(ROOT, "zstd:5").unwrap();
    let value = fx.fs.meta().read(|s| s.getxattr(ROOT, b"claudefs.reduce").map(<[u8]>::to_vec)).unwrap();
    assert_eq!(value, b"cdc:16k:64k:256k,zstd:5");
    let Reply::Entry(d) = fx.apply(Cmd::Mkdir { parent: ROOT, name: b"d".to_vec(), perm: 0o755, by: BY }).unwrap()
    else {
        panic!()
    };
    let cmd = Cmd::Mknod { parent: d.ino, name: b"f".to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0, by: BY };
    let Reply::Entry(f) = fx.apply(cmd).unwrap() else { panic!() };
    let cmd = Cmd::Symlink { parent: ROOT, name: b"l".to_vec(), target: b"x".to_vec(), by: BY };
    let Reply::Entry(l) = fx.apply(cmd).unwrap() else { panic!() };
    fx.fs.meta().read(|s| {
        assert_eq!(s.getxattr(d.ino, b"claudefs.reduce").unwrap(), b"cdc:16k:64k:256k,zstd:5");
        assert!(s.reduce_policy(f.ino).unwrap().is_some(), "a new file under the directory is reduced");
        assert!(s.reduce_policy(plain).unwrap().is_none(), "an existing file keeps its layout");
        assert_eq!(s.getxattr(l.ino, b"claudefs.reduce").err(), Some(Errno::ENODATA));
    });
    fx.write(f.ino, 0, vec![7; 100_000]).unwrap();
    assert_eq!(fx.read(f.ino, 0, 200_000), vec![7; 100_000]);
    assert_eq!(fx.read(plain, 0, 10_000), vec![1; 5000]);
    // Removing it from the directory: new files are plain again.
    fx.apply(Cmd::RemoveXattr { ino: d.ino, name: b"claudefs.reduce".to_vec(), now: Time(4) }).unwrap();
    let cmd = Cmd::Mknod { parent: d.ino, name: b"g".to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0, by: BY };
    let Reply::Entry(g) = fx.apply(cmd).unwrap() else { panic!() };
    assert!(fx.fs.meta().read(|s| s.reduce_policy(g.ino)).unwrap().is_none());
    // Compressible data takes a fraction of its size.
    let s = fx.fs.reduce_stats();
    assert!(s.compression_ratio > 20.0, "{s:?}");
}

/// The audit finds counts that disagree with the files, and repairs them.
#[test]
fn the_audit_finds_and_repairs_wrong_reference_counts() {
    let mut fx = Fx::new(32);
    fx.set_policy(ROOT, "fixed:4k,lz4").unwrap();
    let f = fx.create("f");
    fx.write(f, 0, pattern(1, 40_000)).unwrap();
    let hash = fx.fs.meta().read(|s| s.views(f, 0, 1).unwrap()[0].1.hash);
    fx.apply(Cmd::ReduceRepair { refs: vec![(hash, 5)], logical: 7 }).unwrap();
    let report = fx.run(|fs| Box::pin(async move { fs.reduce_audit(true).await })).unwrap();
    assert_eq!(report.refcount_mismatches.len(), 1, "{report:?}");
    let (_, count, views) = &report.refcount_mismatches[0];
    assert_eq!((*count, *views), (5, 1), "{report:?}");
    assert_eq!(report.logical_mismatch, Some((7, 40_000)));
    assert!(report.repaired);
    fx.audit_clean("after the repair");
    fx.run(|fs| Box::pin(async move { fs.meta().read(|s| s.check()) })).unwrap();
    assert_eq!(fx.read(f, 0, 50_000), pattern(1, 40_000));
}
