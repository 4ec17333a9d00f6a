//! The uring bdev against real files (O_DIRECT on the test machine's file
//! system) and, where the test runs as root, a ramfs that refuses O_DIRECT.

mod common;

use std::path::{Path, PathBuf};

use common::{Harness, pattern};
use nvme::uring::{self, UringConfig};
use nvme::{BdevError, Io, IoType};
use pmd::DmaBuf;

fn config(name: &str, path: &Path, size: Option<u64>) -> UringConfig {
    UringConfig { name: name.into(), filename: path.to_path_buf(), block_size: None, size, direct: true, uuid: None }
}

/// Unmounts a test's mount when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts a new `fstype` on `mnt` (made here), or says why the test of
/// `what` is skipped (it needs root).
fn mount(mnt: &Path, fstype: &str, what: &str) -> Option<Unmount> {
    std::fs::create_dir(mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", fstype, "none"])
        .arg(mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: cannot mount a {fstype} (needs root) to test {what}");
    }
    ok.then(|| Unmount(mnt.to_path_buf()))
}

fn image(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn round_trips_at_many_sizes_offsets_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    let bdev = uring::create(&h.registry, &config("u0", &image(&dir, "u0.img"), Some(64 << 20))).unwrap();
    assert_eq!((bdev.block_size(), bdev.num_blocks()), (4096, 16384));
    let mut ch = h.channel("u0", true);
    let mut rng = fastrand::Rng::with_seed(7);
    for (i, blocks) in [1usize, 2, 3, 16, 64, 255, 512, 1024].into_iter().enumerate() {
        let offset = rng.u64(0..16384 - blocks as u64);
        let data = pattern(i as u64, blocks * 4096);
        h.write(&mut ch, offset, &data).unwrap();
        assert_eq!(h.read(&mut ch, offset, data.len()).unwrap(), data, "{blocks} blocks at {offset}");
    }
    // Vectored write and read.
    let data = pattern(99, 5 * 4096);
    let parts = vec![DmaBuf::copy_from(&data[..4096]).unwrap(), DmaBuf::copy_from(&data[4096..]).unwrap()];
    assert_eq!(h.run(&mut ch, Io::write(100, parts, 0)).status, Ok(()));
    let bufs = vec![DmaBuf::new(3 * 4096).unwrap(), DmaBuf::new(2 * 4096).unwrap()];
    let c = h.run(&mut ch, Io::read(100, bufs, 0));
    assert_eq!(c.status, Ok(()));
    let mut got = vec![0; data.len()];
    c.bufs.copy_out(0, &mut got);
    assert_eq!(got, data);
    // FUA, flush, unmap and write zeroes.
    let c = h.run(&mut ch, Io::write(200, DmaBuf::copy_from(&[1; 8192]).unwrap(), 0).with_fua(true));
    assert_eq!(c.status, Ok(()));
    assert_eq!(h.flush(&mut ch), Ok(()));
    assert_eq!(h.run(&mut ch, Io::unmap(200, 1, 0)).status, Ok(()));
    assert_eq!(h.run(&mut ch, Io::write_zeroes(100, 2, 0)).status, Ok(()));
    assert_eq!(h.read(&mut ch, 200, 8192).unwrap(), [vec![0; 4096], vec![1; 4096]].concat());
    assert_eq!(h.read(&mut ch, 100, 3 * 4096).unwrap(), [vec![0; 8192], data[8192..12288].to_vec()].concat());
    let s = bdev.stats();
    assert!(s.op(IoType::Write).ops >= 10 && s.op(IoType::Read).ops >= 10);
    assert_eq!(s.op(IoType::Write).errors + s.op(IoType::Read).errors, 0);
}

#[test]
fn many_requests_in_flight_complete_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    uring::create(&h.registry, &config("u0", &image(&dir, "u0.img"), Some(16 << 20))).unwrap();
    let mut ch = h.channel("u0", true);
    for i in 0..1000u64 {
        ch.submit(h.now, Io::write(i, DmaBuf::copy_from(&(i as u32).to_le_bytes().repeat(1024)).unwrap(), i));
    }
    let done = h.wait(&mut ch, 1000);
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..1000).collect::<Vec<_>>());
    assert!(done.iter().all(|c| c.status.is_ok()));
    for i in (0..1000u64).step_by(97) {
        assert_eq!(h.read(&mut ch, i, 4096).unwrap(), (i as u32).to_le_bytes().repeat(1024));
    }
}

#[test]
fn two_reactors_drive_their_own_rings_on_one_bdev() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(&dir, "u0.img");
    let registry = nvme::BdevRegistry::new();
    uring::create(&registry, &config("u0", &path, Some(8 << 20))).unwrap();
    let desc = registry.open("u0", true).unwrap();
    let threads: Vec<_> = (0..2u64)
        .map(|r| {
            let desc = desc.clone();
            std::thread::spawn(move || {
                let mut h = Harness::new();
                let mut ch = h.reactor.with_ctx(|ctx| desc.channel(ctx)).unwrap();
                for i in 0..200u64 {
                    let block = r * 1000 + i;
                    ch.submit(h.now, Io::write(block, DmaBuf::copy_from(&pattern(block, 4096)).unwrap(), block));
                }
                assert!(h.wait(&mut ch, 200).iter().all(|c| c.status.is_ok()));
                for i in 0..200u64 {
                    let block = r * 1000 + i;
                    assert_eq!(h.read(&mut ch, block, 4096).unwrap(), pattern(block, 4096));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn dropping_a_channel_with_requests_in_flight_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    uring::create(&h.registry, &config("u0", &image(&dir, "u0.img"), Some(16 << 20))).unwrap();
    let mut keep = h.channel("u0", true);
    let mut doomed = h.channel("u0", true);
    for i in 0..256u64 {
        doomed.submit(h.now, Io::read(i, DmaBuf::new(4096).unwrap(), i));
    }
    h.reactor.poll(1, 1);
    drop(doomed);
    // The ring goes on serving the other channel.
    h.write(&mut keep, 3, &[3; 4096]).unwrap();
    assert_eq!(h.read(&mut keep, 3, 4096).unwrap(), vec![3; 4096]);
}

#[test]
fn existing_files_are_used_as_they_are_and_bad_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = nvme::BdevRegistry::new();
    let missing = image(&dir, "missing.img");
    let err = uring::create(&r, &config("u0", &missing, None)).unwrap_err();
    assert!(matches!(err, BdevError::FileMissing(_)), "{err}");
    assert!(err.to_string().contains("pass `size`"), "{err}");

    let odd = image(&dir, "odd.img");
    std::fs::write(&odd, vec![0u8; 4096 * 3 + 100]).unwrap();
    let err = uring::create(&r, &config("u0", &odd, None)).unwrap_err();
    assert!(matches!(err, BdevError::SizeNotMultiple { size: 12388, block_size: 4096, .. }), "{err}");
    let err = uring::create(&r, &config("u0", &odd, Some(1 << 20))).unwrap_err();
    assert!(err.to_string().contains("exists with 12388 bytes"), "{err}");

    let good = image(&dir, "good.img");
    std::fs::write(&good, pattern(5, 8192)).unwrap();
    let mut h = Harness { registry: r.clone(), ..Harness::new() };
    let bdev = uring::create(&r, &UringConfig { block_size: Some(512), ..config("u0", &good, None) }).unwrap();
    assert_eq!(bdev.num_blocks(), 16);
    let mut ch = h.channel("u0", true);
    assert_eq!(h.read(&mut ch, 1, 1024).unwrap(), pattern(5, 8192)[512..1536]);
    assert!(matches!(uring::create(&r, &config("u0", &good, None)), Err(BdevError::Exists(_))));
    let err = uring::create(&r, &UringConfig { block_size: Some(100), ..config("u1", &good, None) }).unwrap_err();
    assert!(err.to_string().contains("block_size"), "{err}");
    assert!(!image(&dir, "u1-not-created").exists());
}

#[test]
fn a_file_system_without_o_direct_is_named_and_buffered_io_offered() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("ramfs");
    let Some(_guard) = mount(&mnt, "ramfs", "a file system without O_DIRECT") else { return };
    let r = nvme::BdevRegistry::new();
    let path = mnt.join("x.img");
    let err = uring::create(&r, &config("u0", &path, Some(1 << 20))).unwrap_err();
    assert!(matches!(err, BdevError::NoDirectIo(_)), "{err}");
    assert!(err.to_string().contains("\"direct\": false"), "{err}");
    assert!(!path.exists(), "the image created for the attempt is removed again");
    let mut h = Harness { registry: r.clone(), ..Harness::new() };
    uring::create(&r, &UringConfig { direct: false, ..config("u0", &path, Some(1 << 20)) }).unwrap();
    let mut ch = h.channel("u0", true);
    h.write(&mut ch, 2, &[6; 4096]).unwrap();
    assert_eq!(h.read(&mut ch, 2, 4096).unwrap(), vec![6; 4096]);
}

/// Whether the file system holding `dir` zeroes a range of a file in place.
fn zeroes_in_place(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let probe = dir.join("probe");
    std::fs::write(&probe, [1u8; 4096]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&probe).unwrap();
    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: the fd is open for writing; fallocate reads no memory of ours.
    let ok = unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 4096) } == 0;
    std::fs::remove_file(&probe).unwrap();
    ok
}

/// Write zeroes over blocks 16..80 of a 1 MiB file of sevens through a uring
/// bdev; returns the bytes the file has allocated after.
fn zero_a_written_file(dir: &Path, direct: bool) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join("z.img");
    std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
    let mut h = Harness::new();
    uring::create(&h.registry, &UringConfig { direct, ..config("z", &path, None) }).unwrap();
    let mut ch = h.channel("z", true);
    for _ in 0..2 {
        assert_eq!(h.run(&mut ch, Io::write_zeroes(16, 64, 0)).status, Ok(()));
    }
    assert_eq!(h.read(&mut ch, 16, 64 * 4096).unwrap(), vec![0; 64 * 4096]);
    assert_eq!(h.read(&mut ch, 80, 4096).unwrap(), vec![7; 4096], "only the range is zeroed");
    std::fs::metadata(&path).unwrap().blocks() * 512
}

#[test]
fn write_zeroes_keeps_a_files_blocks_or_punches_a_hole_where_it_cannot() {
    // The test machine's file system: zeroed in place where it can, so the
    // blocks stay allocated and later writes into them allocate nothing.
    let dir = tempfile::tempdir().unwrap();
    let allocated = zero_a_written_file(dir.path(), true);
    if zeroes_in_place(dir.path()) {
        assert!(allocated >= 1 << 20, "only {allocated} bytes still allocated");
    }
    // tmpfs cannot zero in place: the bdev falls back to punching a hole.
    let mnt = dir.path().join("tmpfs");
    let Some(_guard) = mount(&mnt, "tmpfs", "write zeroes punching holes") else { return };
    assert!(!zeroes_in_place(&mnt), "tmpfs zeroes in place now: this part tests nothing");
    let allocated = zero_a_written_file(&mnt, false);
    assert!(allocated <= (1 << 20) - 64 * 4096, "{allocated} bytes allocated: no hole was punched");
}

#[test]
fn ring_options_are_fixed_once_a_ring_exists() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    uring::create(&h.registry, &config("u0", &image(&dir, "u0.img"), Some(1 << 20))).unwrap();
    let _ch = h.channel("u0", true);
    let err = uring::set_options(uring::UringOptions::default()).unwrap_err();
    assert!(matches!(err, BdevError::TooLate(_)), "{err}");
    let bad = uring::UringOptions { queue_depth: 3, ..Default::default() };
    assert!(uring::set_options(bad).unwrap_err().to_string().contains("queue_depth"));
}

#[test]
fn a_sleeping_reactor_is_woken_by_io_uring_completions() {
    // An adaptive reactor that sleeps as soon as it is idle: every read below
    // completes while it sleeps, so a lost wake-up would cost a timer tick or more.
    let dir = tempfile::tempdir().unwrap();
    let registry = nvme::BdevRegistry::new();
    uring::create(&registry, &config("u0", &image(&dir, "u0.img"), Some(1 << 20))).unwrap();
    {
        // Written blocks: O_DIRECT reads of holes complete inline, without the device.
        let mut h = Harness { registry: registry.clone(), ..Harness::new() };
        let mut ch = h.channel("u0", true);
        h.write(&mut ch, 0, &pattern(1, 1 << 20)).unwrap();
        h.flush(&mut ch).unwrap();
    }
    let desc = registry.open("u0", false).unwrap();
    let rt = pmd::Runtime::start(pmd::RuntimeOptions { spin_us: 0, pin: false, ..Default::default() }).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    rt.reactors()[0].send(move |ctx| {
        let mut ch = desc.channel(ctx).unwrap();
        let mut left = 500u32;
        let mut done = Vec::new();
        let start = std::time::Instant::now();
        ch.submit(0, Io::read(0, DmaBuf::new(4096).unwrap(), 0));
        ctx.register_poller("reader", 0, move |ctx| {
            done.clear();
            if ch.poll(ctx.now(), &mut done) == 0 {
                return ch.idle_status();
            }
            assert!(done[0].status.is_ok());
            left -= 1;
            if left == 0 {
                let _ = tx.send(start.elapsed());
            } else {
                ch.submit(ctx.now(), Io::read(left as u64 % 256, DmaBuf::new(4096).unwrap(), 0));
            }
            pmd::PollStatus::Busy
        });
    });
    let elapsed = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("500 reads finish");
    assert!(elapsed < std::time::Duration::from_secs(2), "500 reads took {elapsed:?}: wake-ups are being lost");
    assert!(rt.reactors()[0].stats().sleep_ns > 0, "the reactor did sleep between reads");
}
