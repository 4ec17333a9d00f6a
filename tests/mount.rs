//! `claudefs up` as a user runs it: a real FUSE mount of a file system on an
//! image file, used with ordinary file operations, stopped cleanly, killed
//! with -9 and restarted, and refused bad mount points with their reasons.
//! Needs root and /dev/fuse; says so and skips without them.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_claudefs");

fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: FUSE mounts need root and /dev/fuse (root: {root})");
        return false;
    }
    true
}

struct Up {
    child: Child,
    socket: PathBuf,
    mount: PathBuf,
    log: common::Captured,
}

impl Up {
    /// Starts `claudefs up` and waits for the mount; `Err` with its output if it exits.
    fn start(dir: &Path, image: &Path, mount: &Path) -> Result<Up, String> {
        Self::spawn(dir, image, mount).wait_mounted()
    }

    /// Waits until the spawned `up` has mounted; `Err` with its output if it exits.
    fn wait_mounted(mut self) -> Result<Up, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited with {status}: {}", self.log.all()));
            }
            // The server's own word, not the mount table: a stale mount of a
            // killed server is listed there too.
            if self.log().contains("file system mounted on") {
                return Ok(self);
            }
            assert!(Instant::now() < deadline, "not mounted after 30 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs an `up` that must fail; returns what it said.
    fn refused(dir: &Path, image: &Path, mount: &Path) -> String {
        Self::refused_with(dir, image, mount, &[])
    }

    /// [`Up::refused`] with `extra` options.
    fn refused_with(dir: &Path, image: &Path, mount: &Path, extra: &[&str]) -> String {
        let mut up = Self::spawn_with(dir, image, mount, "256m", extra);
        let deadline = Instant::now() + Duration::from_secs(30);
        while up.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "still running after 30 s: {}", up.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        up.mount = PathBuf::new(); // not ours to unmount
        up.log.all()
    }

    fn spawn(dir: &Path, image: &Path, mount: &Path) -> Up {
        Self::spawn_sized(dir, image, mount, "256m")
    }

    fn spawn_sized(dir: &Path, image: &Path, mount: &Path, size: &str) -> Up {
        Self::spawn_with(dir, image, mount, size, &[])
    }

    /// `up` with a new image of `size` and `extra` options.
    fn spawn_with(dir: &Path, image: &Path, mount: &Path, size: &str, extra: &[&str]) -> Up {
        let socket = dir.join("up.sock");
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(BIN)
            .arg("up")
            .arg("--image")
            .arg(image)
            .args(["--size", size, "--mount"])
            .arg(mount)
            .args(extra)
            .arg("-r")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = common::capture_stderr(&mut child);
        Up { child, socket, mount: mount.to_path_buf(), log }
    }

    fn log(&self) -> String {
        self.log.text()
    }

    /// Calls a method on the server's control socket; its result.
    fn rpc(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("rpc")
            .arg("-s")
            .arg(&self.socket)
            .arg(method)
            .arg(params.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{method}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `claudefs down`, then waits for the process and checks the mount is gone.
    fn down(mut self) {
        let out = Command::new(BIN).arg("down").arg("-s").arg(&self.socket).output().unwrap();
        assert!(out.status.success(), "down: {}", String::from_utf8_lossy(&out.stderr));
        let status = self.child.wait().unwrap();
        let log = self.log.all();
        assert!(status.success(), "up exited with {status}: {log}");
        assert!(!mounted(&self.mount), "still mounted after down: {log}");
        assert!(log.contains("blobstore unloaded"), "no clean unload: {log}");
    }

    /// Stops the server with a signal (Ctrl-C is SIGINT); it must unmount
    /// and unload as `down` does.
    fn signal(mut self, signal: i32) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
        let status = self.child.wait().unwrap();
        let log = self.log.all();
        assert!(status.success(), "up exited with {status} on signal {signal}: {log}");
        assert!(!mounted(&self.mount), "still mounted after signal {signal}");
        assert!(log.contains("blobstore unloaded"), "no clean unload: {log}");
    }

    /// Kills the server with SIGKILL, leaving its mount as a crash would.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.mount = PathBuf::new();
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.mount.as_os_str().is_empty() && mounted(&self.mount) {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_string_lossy().to_string();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn setup() -> Option<(tempfile::TempDir, PathBuf, PathBuf)> {
    if !can_mount() {
        return None;
    }
    // On the root disk, not /tmp: the image needs O_DIRECT, which tmpfs lacks.
    let dir = tempfile::Builder::new().prefix("claudefs-mount-").tempdir_in("/var/tmp").unwrap();
    let (image, mount) = (dir.path().join("disk.img"), dir.path().join("mnt"));
    std::fs::create_dir(&mount).unwrap();
    Some((dir, image, mount))
}

#[test]
fn files_directories_and_links_work_through_the_mount_and_survive_a_restart() {
    let Some((dir, image, mnt)) = setup() else { return };
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    // The new image is written in full: the host backs every block but what
    // formatting zeroed again (write zeroes punches a hole in a file: a few
    // metadata clusters); a sparse image would have a few MiB.
    let meta = std::fs::metadata(&image).unwrap();
    let allocated = meta.blocks() * 512;
    assert!(allocated + (16 << 20) >= meta.len(), "{allocated} of {} bytes allocated", meta.len());
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(mnt.join("big"), &data).unwrap();
    std::fs::create_dir_all(mnt.join("a/b")).unwrap();
    std::fs::write(mnt.join("a/b/f"), b"hello").unwrap();
    std::fs::hard_link(mnt.join("a/b/f"), mnt.join("a/link")).unwrap();
    std::os::unix::fs::symlink("b/f", mnt.join("a/sym")).unwrap();
    std::fs::rename(mnt.join("a/b"), mnt.join("c")).unwrap();
    std::fs::set_permissions(mnt.join("c/f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // A sparse file with data at both ends.
    let mut sparse = std::fs::File::create(mnt.join("sparse")).unwrap();
    sparse.write_all(b"head").unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, b"tail", 5 << 30).unwrap();
    sparse.sync_all().unwrap();
    drop(sparse);

    let check = |mnt: &Path| {
        assert_eq!(std::fs::read(mnt.join("big")).unwrap(), data);
        assert_eq!(std::fs::read(mnt.join("a/link")).unwrap(), b"hello");
        assert_eq!(std::fs::read_link(mnt.join("a/sym")).unwrap(), Path::new("b/f"));
        let f = std::fs::metadata(mnt.join("c/f")).unwrap();
        assert_eq!((f.mode() & 0o7777, f.nlink()), (0o600, 2));
        assert_eq!(std::fs::metadata(mnt.join("sparse")).unwrap().len(), (5 << 30) + 4);
        let s = std::fs::File::open(mnt.join("sparse")).unwrap();
        let mut mid = vec![1u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(&s, &mut mid, 1 << 30).unwrap();
        assert!(mid.iter().all(|&b| b == 0), "a hole reads as zeros");
        let mut end = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&s, &mut end, 5 << 30).unwrap();
        assert_eq!(&end, b"tail");
        let mut names: Vec<String> =
            std::fs::read_dir(mnt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["a", "big", "c", "sparse"]);
    };
    check(&mnt);
    up.down();
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    check(&mnt);
    up.down();
}

#[test]
fn what_was_fsynced_survives_kill_9_and_the_stale_mount_is_recovered() {
    let Some((dir, image, mnt)) = setup() else { return };
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    std::fs::create_dir(mnt.join("d")).unwrap();
    for i in 0..20 {
        let mut f = std::fs::File::create(mnt.join(format!("d/f{i}"))).unwrap();
        f.write_all(&vec![i as u8; 10_000 + i * 1000]).unwrap();
        f.sync_all().unwrap();
    }
    std::fs::File::open(mnt.join("d")).unwrap().sync_all().unwrap();
    up.kill9();
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    for i in 0..20 {
        assert_eq!(std::fs::read(mnt.join(format!("d/f{i}"))).unwrap(), vec![i as u8; 10_000 + i * 1000]);
    }
    assert!(up.log().contains("detaching"), "the stale mount was detached: {}", up.log());
    up.down();
}

/// O_DIRECT writes from several threads at once, each answered once the
/// device has its bytes (the first to each block mapped behind the answer,
/// the second mostly over the same pages in place): read back right
/// after (direct and through the page cache) they are what was written,
/// the later of two writes to a block wins, and after fsync they survive
/// kill -9.
#[test]
fn direct_writes_from_several_threads_read_back_and_survive_kill_9_after_fsync() {
    #[repr(C, align(4096))]
    struct Block([u8; 4096]);
    const BLOCKS: u64 = 1024;
    let Some((dir, image, mnt)) = setup() else { return };
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    let path = mnt.join("direct");
    let open =
        || std::fs::OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(&path);
    let file = open().unwrap();
    file.set_len(BLOCKS * 4096).unwrap();
    // Thread t writes every block b with b % 4 == t, twice: the second
    // value must be the one that stays.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let file = &file;
            s.spawn(move || {
                for round in 0..2u8 {
                    for b in (t..BLOCKS).step_by(4) {
                        let block = Block([(b as u8).wrapping_mul(3) ^ round; 4096]);
                        std::os::unix::fs::FileExt::write_all_at(file, &block.0, b * 4096).unwrap();
                    }
                }
            });
        }
    });
    let want = |b: u64| (b as u8).wrapping_mul(3) ^ 1;
    let check = |how: &str, read: &dyn Fn(&mut Block, u64)| {
        let mut block = Block([0; 4096]);
        for b in 0..BLOCKS {
            read(&mut block, b);
            assert!(block.0.iter().all(|&x| x == want(b)), "{how}: block {b} holds {} not {}", block.0[0], want(b));
        }
    };
    check("direct", &|block, b| std::os::unix::fs::FileExt::read_exact_at(&file, &mut block.0, b * 4096).unwrap());
    let cached = std::fs::File::open(&path).unwrap();
    check("cached", &|block, b| std::os::unix::fs::FileExt::read_exact_at(&cached, &mut block.0, b * 4096).unwrap());
    file.sync_all().unwrap();
    drop((file, cached));
    up.kill9();
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    let file = open().unwrap();
    check("after kill -9", &|block, b| {
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut block.0, b * 4096).unwrap()
    });
    drop(file);
    up.down();
}

#[test]
fn posix_errors_come_back_through_the_mount() {
    let Some((dir, image, mnt)) = setup() else { return };
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    std::fs::write(mnt.join("file"), b"x").unwrap();
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/inner"), b"y").unwrap();
    assert_eq!(errno_of(std::fs::write(mnt.join("x".repeat(256)), b"")), libc::ENAMETOOLONG);
    assert_eq!(errno_of(std::fs::write(mnt.join("file/below"), b"")), libc::ENOTDIR);
    assert_eq!(errno_of(std::fs::remove_dir(mnt.join("dir"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(std::fs::create_dir(mnt.join("dir"))), libc::EEXIST);
    assert_eq!(errno_of(std::fs::remove_file(mnt.join("missing"))), libc::ENOENT);
    assert_eq!(errno_of(std::fs::hard_link(mnt.join("dir"), mnt.join("dir2"))), libc::EPERM);
    assert_eq!(errno_of(std::fs::rename(mnt.join("dir"), mnt.join("dir/sub"))), libc::EINVAL);
    up.down();
}

/// A running binary cannot be opened for writing or truncated (ETXTBSY),
/// and a refused `O_RDONLY|O_TRUNC` leaves it whole: with FUSE's atomic
/// O_TRUNC the server truncated it before the kernel refused the open, and
/// the program crashed on its emptied pages.
#[test]
fn a_running_binary_is_neither_opened_for_writing_nor_truncated() {
    let Some((dir, image, mnt)) = setup() else { return };
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    let original = std::fs::read("/bin/sleep").unwrap();
    let bin = mnt.join("sleep");
    std::fs::write(&bin, &original).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let open = |flags: i32| {
        let mode = flags & libc::O_ACCMODE;
        let mut o = std::fs::OpenOptions::new();
        o.read(mode != libc::O_WRONLY).write(mode != libc::O_RDONLY).custom_flags(flags & !libc::O_ACCMODE);
        errno_of(o.open(&bin))
    };
    let mut running = Command::new(&bin).arg("30").spawn().unwrap();
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(open(flags), libc::ETXTBSY, "open with flags {flags:#x} of a running binary");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(running.try_wait().unwrap().is_none(), "the binary stopped running: {:?}", running.try_wait());
    assert!(std::fs::read(&bin).unwrap() == original, "the running binary was changed");
    running.kill().unwrap();
    running.wait().unwrap();
    // Once it has stopped, O_TRUNC truncates.
    assert_eq!(open(libc::O_RDONLY | libc::O_TRUNC), 0);
    assert_eq!(std::fs::metadata(&bin).unwrap().len(), 0);
    up.down();
}

#[test]
fn ctrl_c_and_sigterm_unmount_and_stop_cleanly() {
    let Some((dir, image, mnt)) = setup() else { return };
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let up = Up::start(dir.path(), &image, &mnt).unwrap();
        std::fs::write(mnt.join(format!("f{signal}")), b"kept").unwrap();
        up.signal(signal);
    }
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    assert_eq!(std::fs::read(mnt.join(format!("f{}", libc::SIGINT))).unwrap(), b"kept");
    assert_eq!(std::fs::read(mnt.join(format!("f{}", libc::SIGTERM))).unwrap(), b"kept");
    up.down();
}

#[test]
fn a_busy_mount_stays_mounted_on_umount_and_is_detached_at_down() {
    use std::io::Read;
    let Some((dir, image, mnt)) = setup() else { return };
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    std::fs::write(mnt.join("f"), b"kept").unwrap();
    let cli = |cmd: &str| Command::new(BIN).arg(cmd).arg("-s").arg(&up.socket).arg(&mnt).output().unwrap();
    // A file open on it: `umount` is refused, as umount(8) refuses, and the
    // mount goes on being served.
    let held = std::fs::File::open(mnt.join("f")).unwrap();
    let out = cli("umount");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is busy"), "{err}");
    assert!(mounted(&mnt), "a refused umount unmounted");
    let mut text = String::new();
    (&held).read_to_string(&mut text).unwrap();
    assert_eq!(text, "kept");
    std::fs::write(mnt.join("g"), b"new").unwrap();
    let mounts = up.rpc("fs_get_mounts", serde_json::json!({}));
    assert!(mounts.to_string().contains(&*mnt.canonicalize().unwrap().to_string_lossy()), "{mounts}");
    // Closed, it unmounts; mounted again, everything is there.
    drop(held);
    let out = cli("umount");
    assert!(out.status.success() && !mounted(&mnt), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli("mount");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(mnt.join("g")).unwrap(), b"new");
    // The server going down does not wait for a busy mount: it is detached,
    // the store unloads cleanly, and the holder hears ENOTCONN.
    let held = std::fs::File::open(mnt.join("f")).unwrap();
    up.down();
    assert_eq!(errno_of((&held).read(&mut [0u8; 4])), libc::ENOTCONN);
}

#[test]
fn bad_images_are_refused_with_their_reason() {
    let Some((dir, image, mnt)) = setup() else { return };
    // An image on a file system without O_DIRECT (ramfs): refused, and not left behind.
    let ramfs = dir.path().join("ramfs");
    std::fs::create_dir(&ramfs).unwrap();
    let ok = Command::new("mount").args(["-t", "ramfs", "ramfs"]).arg(&ramfs).status().unwrap();
    assert!(ok.success(), "mounting a ramfs");
    let err = Up::refused(dir.path(), &ramfs.join("disk.img"), &mnt);
    let _ = Command::new("umount").arg(&ramfs).status();
    assert!(err.contains("does not support O_DIRECT"), "{err}");
    assert!(err.contains("opening the image"), "{err}");

    // Both copies of the blobstore's super block damaged: refused, and named.
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    std::fs::write(mnt.join("f"), b"data").unwrap();
    up.down();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
    for page in [0u64, 4096] {
        let mut p = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut p, page).unwrap();
        p[100..140].iter_mut().for_each(|b| *b ^= 0x5a);
        std::os::unix::fs::FileExt::write_all_at(&f, &p, page).unwrap();
    }
    let err = Up::refused(dir.path(), &image, &mnt);
    assert!(err.contains("holds no ClaudeFS blobstore") && err.contains("checksum mismatch"), "{err}");
    assert!(!mounted(&mnt));
    // Random bytes where an image belongs: refused, never formatted over.
    let junk: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&image, &junk).unwrap();
    let err = Up::refused(dir.path(), &image, &mnt);
    assert!(err.contains("no metadata page here"), "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), junk, "the image is untouched");
}

#[test]
fn processes_creating_renaming_and_appending_in_one_directory_see_a_consistent_tree() {
    let Some((dir, image, mnt)) = setup() else { return };
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    std::fs::create_dir(mnt.join("d")).unwrap();
    // Four shells at once, each: create, rename, append to one shared log.
    let script = r#"for i in $(seq 1 150); do
        printf "%s-%s
" "$1" "$i" > "d/tmp-$1-$i"
        mv "d/tmp-$1-$i" "d/f-$1-$i"
        printf "%s-%s
" "$1" "$i" >> d/shared
        [ $((i % 10)) -eq 0 ] && rm "d/f-$1-$((i - 5))"
    done"#;
    let children: Vec<Child> = (0..4)
        .map(|p| {
            Command::new("sh").arg("-c").arg(script).arg("sh").arg(p.to_string()).current_dir(&mnt).spawn().unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let mut names: Vec<String> =
        std::fs::read_dir(mnt.join("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let mut want = vec!["shared".to_string()];
    for p in 0..4 {
        for i in 1..=150 {
            if i % 10 != 5 {
                want.push(format!("f-{p}-{i}"));
            }
        }
    }
    want.sort();
    assert_eq!(names, want);
    for name in want.iter().filter(|n| n.starts_with("f-")) {
        let body = std::fs::read_to_string(mnt.join("d").join(name)).unwrap();
        assert_eq!(
            body,
            format!(
                "{}
",
                &name[2..]
            ),
            "{name}"
        );
    }
    let mut lines: Vec<String> =
        std::fs::read_to_string(mnt.join("d/shared")).unwrap().lines().map(String::from).collect();
    lines.sort();
    let mut appended: Vec<String> = (0..4).flat_map(|p| (1..=150).map(move |i| format!("{p}-{i}"))).collect();
    appended.sort();
    assert_eq!(lines, appended, "every append landed once, none overwrote another");
    up.down();
}

#[test]
fn stress_ng_filesystem_stressors_run_without_errors() {
    let Some((dir, image, mnt)) = setup() else { return };
    let Some(stress) = ["/usr/bin/stress-ng", "/usr/local/bin/stress-ng"].into_iter().find(|p| Path::new(p).exists())
    else {
        eprintln!("skipping: stress-ng is not installed (hack/deps.sh test installs it)");
        return;
    };
    let up = Up::spawn_sized(dir.path(), &image, &mnt, "2g");
    let up = up.wait_mounted().unwrap();
    // The file system class, one stressor after another, a second each.
    // binderfs is not a file system test (it mounts one of its own, which
    // this kernel lacks); fiemap and verity skip themselves on FUSE.
    let out = Command::new(stress)
        .args(["--class", "filesystem", "--sequential", "1", "--timeout", "1", "--verify", "--metrics-brief"])
        .args(["--exclude", "binderfs"])
        .arg("--temp-path")
        .arg(&mnt)
        .current_dir(&mnt)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let failed: Vec<&str> = text.lines().filter(|l| l.contains("fail:") || l.contains("error:")).collect();
    assert!(
        out.status.success() && failed.is_empty(),
        "stress-ng: {}
{}",
        out.status,
        failed.join(
            "
"
        )
    );
    assert!(text.contains("successful run completed"), "{text}");
    std::fs::write(mnt.join("after"), b"still fine").unwrap();
    up.down();
}

#[test]
fn a_full_device_says_enospc_keeps_what_was_written_and_deleting_frees_space() {
    let Some((dir, image, mnt)) = setup() else { return };
    let up = Up::spawn_sized(dir.path(), &image, &mnt, "96m").wait_mounted().unwrap();
    let block = vec![0xabu8; 1 << 20];
    let mut written = 0usize;
    let err = loop {
        let path = mnt.join(format!("f{written}"));
        let r = std::fs::File::create(&path).and_then(|mut f| {
            f.write_all(&block)?;
            f.sync_all()
        });
        match r {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 200, "a 96 MiB image took 200 MiB");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written > 30, "only {written} MiB fit in 96 MiB");
    for i in 0..written {
        assert_eq!(std::fs::read(mnt.join(format!("f{i}"))).unwrap(), block, "f{i} after ENOSPC");
    }
    for i in 0..written {
        std::fs::remove_file(mnt.join(format!("f{i}"))).unwrap();
    }
    let _ = std::fs::remove_file(mnt.join(format!("f{written}")));
    for i in 0..written / 2 {
        std::fs::write(mnt.join(format!("g{i}")), &block).unwrap();
    }
    up.down();
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    assert_eq!(std::fs::read(mnt.join("g0")).unwrap(), block);
    up.down();
}

#[test]
fn bad_mount_points_are_refused_with_their_reason() {
    let Some((dir, image, mnt)) = setup() else { return };
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"").unwrap();
    for (path, why) in
        [(dir.path().join("missing"), "does not exist"), (file, "is not a directory"), (full, "is not empty")]
    {
        let err = Up::refused(dir.path(), &image, &path);
        assert!(err.contains(why), "{}: {err}", path.display());
    }
    // Already mounted: a second `up` on the same mount point is refused, the first keeps working.
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let err = Up::refused(&second, &second.join("other.img"), &mnt);
    assert!(err.contains("is already a mount point"), "{err}");
    // The same file system on a second mount point: two metadata groups on
    // one log would each miss the other's files.
    let again = dir.path().join("again");
    std::fs::create_dir(&again).unwrap();
    let out = Command::new(BIN).arg("mount").arg("-s").arg(&up.socket).arg(&again).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !mounted(&again), "a second mount of one file system: {err}");
    assert!(err.contains(&format!("already mounted on {}", mnt.canonicalize().unwrap().display())), "{err}");
    // Nor do the blob methods change the blobs of a mounted file system
    // (its root, its metadata log, its data); reading them is fine.
    let blobs = up.rpc("blob_list", serde_json::json!({ "bdev_name": "Uring0" }));
    assert!(blobs.as_array().is_some_and(|b| b.len() >= 3), "{blobs}");
    for (method, params) in [
        ("blob_resize", serde_json::json!({ "bdev_name": "Uring0", "blob_id": 2, "num_clusters": 1 })),
        ("blob_delete", serde_json::json!({ "bdev_name": "Uring0", "blob_id": 1 })),
        ("blob_set_xattr", serde_json::json!({ "bdev_name": "Uring0", "blob_id": 1, "name": "x", "value": "y" })),
        ("blobstore_set_super", serde_json::json!({ "bdev_name": "Uring0", "blob_id": null })),
        ("blob_create", serde_json::json!({ "bdev_name": "Uring0", "num_clusters": 1 })),
    ] {
        let out = Command::new(BIN).arg("rpc").arg("-s").arg(&up.socket).arg(method).arg(params.to_string()).output();
        let out = out.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("holds the file system mounted on"), "{method}: {err}");
    }
    std::fs::write(mnt.join("still"), b"ok").unwrap();
    up.down();
    // All of it is still there.
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    assert_eq!(std::fs::read(mnt.join("still")).unwrap(), b"ok");
    up.down();
}

/// pjdfstest installed by `hack/deps.sh test` (in `$HOME/.cargo/bin` or on PATH).
/// Whether the kernel offers FUSE over io_uring (hack/deps.sh turns it on
/// where the kernel has it).
fn uring_offered() -> bool {
    let on = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y");
    if !on {
        eprintln!("note: the kernel offers no FUSE io_uring queues here; every mount uses /dev/fuse");
    }
    on
}

fn pjdfstest() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/pjdfstest"));
    home.filter(|p| p.exists()).or_else(|| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("pjdfstest")).find(|p| p.exists())
    })
}

#[test]
fn pjdfstest_passes_on_the_mount() {
    let Some((dir, image, mnt)) = setup() else { return };
    let Some(bin) = pjdfstest() else {
        eprintln!("skipping: pjdfstest is not installed (hack/deps.sh test installs it)");
        return;
    };
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/pjdfstest.toml");
    // Without and with the kernel's writeback cache, and over /dev/fuse
    // where the kernel would offer io_uring queues.
    for extra in [&[][..], &["--writeback-cache"], &["--dev-fuse-only"]] {
        let up = Up::spawn_with(dir.path(), &image, &mnt, "256m", extra).wait_mounted().unwrap();
        let mounts = up.rpc("fs_get_mounts", serde_json::json!({}));
        let ring = !extra.contains(&"--dev-fuse-only") && uring_offered();
        assert_eq!(mounts[0]["fuse_transport"], if ring { "io_uring" } else { "/dev/fuse" }, "{mounts}");
        let work = mnt.join("work");
        std::fs::create_dir(&work).unwrap();
        let out = Command::new(&bin).arg("-c").arg(&config).arg("-p").arg(&work).current_dir(&work).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        let summary = text.lines().find(|l| l.starts_with("Summary:")).unwrap_or("no summary line").to_string();
        eprintln!("pjdfstest {extra:?}: {summary}");
        let failed: Vec<&str> = text.lines().filter(|l| l.trim_end().ends_with("FAILED")).collect();
        assert!(
            out.status.success() && summary.starts_with("Summary: 0 failed"),
            "{extra:?}: {summary}\n{}",
            failed.join("\n")
        );
        std::fs::remove_dir_all(&work).unwrap();
        up.down();
    }
}

/// With the writeback cache, writes sit in the kernel until written back:
/// `down` writes them back before it stops, `fsync` before it returns; and
/// the kernel's hold on unlinked inodes (until it forgets them) does not
/// leak them.
#[test]
fn the_writeback_cache_loses_nothing_at_down_or_after_fsync() {
    let Some((dir, image, mnt)) = setup() else { return };
    let wb = |dir: &Path| Up::spawn_with(dir, &image, &mnt, "256m", &["--writeback-cache"]).wait_mounted().unwrap();
    let inodes = |up: &Up| -> u64 {
        let out = Command::new(BIN).args(["rpc", "fs_get_stats", "-s"]).arg(&up.socket).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().and_then(|a| a.first()).unwrap_or(&v)["inodes"].as_u64().unwrap_or_else(|| panic!("{v}"))
    };
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 + i / 4096) as u8).collect();
    let up = wb(dir.path());
    let before = inodes(&up);
    std::fs::write(mnt.join("unsynced"), &data).unwrap();
    for i in 0..200 {
        std::fs::write(mnt.join(format!("t{i}")), b"x").unwrap();
    }
    for i in 0..200 {
        std::fs::remove_file(mnt.join(format!("t{i}"))).unwrap();
    }
    // Deleted inodes go once the kernel forgets them (soon: nothing holds them).
    let deadline = Instant::now() + Duration::from_secs(20);
    while inodes(&up) != before + 1 {
        assert!(Instant::now() < deadline, "unlinked inodes were not reclaimed: {} for {}", inodes(&up), before + 1);
        std::thread::sleep(Duration::from_millis(50));
    }
    up.down();
    let up = wb(dir.path());
    assert_eq!(std::fs::read(mnt.join("unsynced")).unwrap(), data, "written back at down");
    let mut f = std::fs::File::create(mnt.join("synced")).unwrap();
    f.write_all(&data[..1_000_000]).unwrap();
    f.sync_all().unwrap();
    up.kill9();
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    assert_eq!(std::fs::read(mnt.join("synced")).unwrap(), &data[..1_000_000], "written back by fsync");
    up.down();
}

/// The file system drops privileges itself (FUSE's KILLPRIV_V2, which
/// spares each write a GETXATTR round trip), as a local file system's VFS
/// does: any write, truncate or fallocate takes a file's capabilities; one
/// by a user without CAP_FSETID takes the set-user-ID bit too, and the
/// set-group-ID bit where the group may execute; a change of owner takes
/// them whoever makes it, but not from a directory.
#[test]
fn writes_truncates_and_chowns_drop_set_id_bits_and_capabilities() {
    let Some((dir, image, mnt)) = setup() else { return };
    // The user below must reach the mount.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Without and with the kernel's writeback cache (whose writes reach us
    // from the kernel's flusher, not from the writer).
    for extra in [&[][..], &["--writeback-cache"]] {
        let up = Up::spawn_with(dir.path(), &image, &mnt, "256m", extra).wait_mounted().unwrap();
        let work = mnt.join("work");
        std::fs::create_dir(&work).unwrap();
        drops_privileges_in(&work, &format!("{extra:?}"));
        std::fs::remove_dir_all(&work).unwrap();
        up.down();
    }
}

/// The body of `writes_truncates_and_chowns_drop_set_id_bits_and_capabilities`, in `dir` on the mount.
fn drops_privileges_in(dir: &Path, how: &str) {
    let f = dir.join("f");
    std::fs::write(&f, b"abc").unwrap();
    // A version 2 capability set: CAP_NET_BIND_SERVICE, effective.
    let caps: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let set = |mode: u32, with_caps: bool| {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        if with_caps {
            set_xattr(&f, "security.capability", &caps).unwrap();
        }
    };
    let mode = || std::fs::metadata(&f).unwrap().mode() & 0o7777;
    let has_caps = || get_xattr(&f, "security.capability").is_ok();
    let as_nobody = |script: &str| {
        let status = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script])
            .arg("sh")
            .arg(&f)
            .status()
            .unwrap();
        assert!(status.success(), "{how}: {script} as nobody: {status}");
    };
    let append_as_root = || std::fs::OpenOptions::new().append(true).open(&f).unwrap().write_all(b"r").unwrap();

    set(0o6757, true);
    append_as_root();
    assert_eq!((mode(), has_caps()), (0o6757, false), "{how}: a write by root: the caps go, the set-ID bits stay");
    set(0o6757, true);
    as_nobody(r#"printf x >> "$1""#);
    assert_eq!((mode(), has_caps()), (0o0757, false), "{how}: a write by a user: both go");
    set(0o2646, false);
    as_nobody(r#"printf x >> "$1""#);
    assert_eq!(mode(), 0o2646, "{how}: set-group-ID without group execute marks locking, and stays");
    set(0o6757, true);
    as_nobody(r#"truncate -s 1 "$1""#);
    assert_eq!((mode(), has_caps()), (0o0757, false), "{how}: a truncate by a user");
    set(0o6757, true);
    as_nobody(r#"fallocate -l 2 "$1""#);
    assert_eq!((mode(), has_caps()), (0o0757, false), "{how}: a fallocate by a user");
    set(0o6757, true);
    std::fs::File::options().write(true).open(&f).unwrap().set_len(5).unwrap();
    assert_eq!((mode(), has_caps()), (0o6757, false), "{how}: a truncate by root");
    set(0o6757, true);
    std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
    assert_eq!((mode(), has_caps()), (0o0757, false), "{how}: a change of owner, even by root");
    let d = dir.join("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o2755)).unwrap();
    std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
    assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o2755, "{how}: a directory keeps its set-group-ID bit");
    assert_eq!(std::fs::read(&f).unwrap(), b"a\0\0\0\0", "{how}: cut to 1 byte, then grown to 5");
}

/// Sets an xattr through the mount (std has no call for it).
fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated and outlive the call; value is
    // a valid slice of its length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Reads an xattr through the mount.
fn get_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: as in set_xattr; buf is writable for its length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// A directory with a reduction policy (set by its xattr through the mount):
/// copies of a file are stored once, compressed and encrypted; the audit is
/// clean; all survives kill -9 with the key, and without it the file system
/// is refused.
#[test]
fn reduced_directories_dedupe_compress_and_encrypt_through_the_mount() {
    let Some((dir, image, mnt)) = setup() else { return };
    let key = dir.path().join("key");
    std::fs::write(&key, [0x5a; 32]).unwrap();
    let key_arg = ["--key-file", key.to_str().unwrap()];
    let up = Up::spawn_with(dir.path(), &image, &mnt, "256m", &key_arg).wait_mounted().unwrap();
    let r = mnt.join("r");
    std::fs::create_dir(&r).unwrap();
    assert_eq!(errno_of(set_xattr(&r, "claudefs.reduce", b"no such policy")), libc::EINVAL);
    set_xattr(&r, "claudefs.reduce", b"cdc:16k:64k:256k,lz4,enc").unwrap();
    assert_eq!(get_xattr(&r, "claudefs.reduce").unwrap(), b"cdc:16k:64k:256k,lz4,enc");
    let data = common::random_bytes(8 << 20);
    let text: Vec<u8> = (0..4 << 20).map(|i: u32| b"claudefs reduces this line of text\n"[(i % 35) as usize]).collect();
    std::fs::write(r.join("src"), &data).unwrap();
    std::fs::write(r.join("text"), &text).unwrap();
    for i in 0..5 {
        std::fs::copy(r.join("src"), r.join(format!("copy{i}"))).unwrap();
    }
    let stats = &up.rpc("fs_get_reduce_stats", serde_json::json!({}))[0];
    assert_eq!(stats["logical_bytes"], 6 * (8 << 20) + (4 << 20), "{stats}");
    // Stored once: the random file and the text (whose chunks differ, by phase).
    assert!(stats["unique_bytes"].as_u64().unwrap() <= (12 << 20) + (1 << 20), "{stats}");
    assert!(stats["compression_ratio"].as_f64().unwrap() > 1.3, "{stats}");
    assert!(stats["reduction_ratio"].as_f64().unwrap() > 5.0, "{stats}");
    let policy = up.rpc("fs_get_reduce_policy", serde_json::json!({ "mountpoint": mnt, "path": "r/copy3" }));
    assert_eq!(policy["reduced"], true, "{policy}");
    let audit = up.rpc("reduce_audit", serde_json::json!({ "mountpoint": mnt }));
    assert_eq!(audit["clean"], true, "{audit}");
    assert!(audit["frames_checked"].as_u64().unwrap() > 100, "{audit}");
    let check = |mnt: &Path| {
        for i in 0..5 {
            assert!(std::fs::read(mnt.join(format!("r/copy{i}"))).unwrap() == data, "copy{i} differs");
        }
        assert!(std::fs::read(mnt.join("r/text")).unwrap() == text, "text differs");
    };
    check(&mnt);
    // The image holds no plaintext: the text is compressed and encrypted.
    let needle = "reduces this line of text";
    std::fs::File::open(mnt.join("r")).unwrap().sync_all().unwrap();
    up.kill9();
    let found = Command::new("grep").args(["-q", "-a", "-F"]).arg(needle).arg(&image).status().unwrap();
    assert_eq!(found.code(), Some(1), "plaintext found in the image (or grep failed)");
    let refused = Up::refused(dir.path(), &image, &mnt);
    assert!(refused.contains("holds a master key"), "{refused}");
    let up = Up::spawn_with(dir.path(), &image, &mnt, "256m", &key_arg).wait_mounted().unwrap();
    check(&mnt);
    let audit = up.rpc("reduce_audit", serde_json::json!({ "mountpoint": mnt }));
    assert_eq!(audit["clean"], true, "{audit}");
    up.down();
}
