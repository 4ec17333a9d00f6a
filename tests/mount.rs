//! `claudefs up` as a user runs it: a real FUSE mount of a file system on an
//! image file, used with ordinary file operations, stopped cleanly, killed
//! with -9 and restarted, and refused bad mount points with their reasons.
//! Needs root and /dev/fuse; says so and skips without them.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Up {
    /// Starts `claudefs up` and waits for the mount; `Err` with its output if it exits.
    fn start(dir: &Path, image: &Path, mount: &Path) -> Result<Up, String> {
        let mut up = Self::spawn(dir, image, mount);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = up.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("exited with {status}: {}", up.log()));
            }
            // The server's own word, not the mount table: a stale mount of a
            // killed server is listed there too.
            if up.log().contains("file system mounted on") {
                return Ok(up);
            }
            assert!(Instant::now() < deadline, "not mounted after 30 s: {}", up.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs an `up` that must fail; returns what it said.
    fn refused(dir: &Path, image: &Path, mount: &Path) -> String {
        let mut up = Self::spawn(dir, image, mount);
        let deadline = Instant::now() + Duration::from_secs(30);
        while up.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "still running after 30 s: {}", up.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        up.mount = PathBuf::new(); // not ours to unmount
        up.log()
    }

    fn spawn(dir: &Path, image: &Path, mount: &Path) -> Up {
        let socket = dir.join("up.sock");
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(BIN)
            .arg("up")
            .arg("--image")
            .arg(image)
            .args(["--size", "256m", "--mount"])
            .arg(mount)
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
        self.log.lock().unwrap().clone()
    }

    /// `claudefs down`, then waits for the process and checks the mount is gone.
    fn down(mut self) {
        let out = Command::new(BIN).arg("down").arg("-s").arg(&self.socket).output().unwrap();
        assert!(out.status.success(), "down: {}", String::from_utf8_lossy(&out.stderr));
        let status = self.child.wait().unwrap();
        assert!(status.success(), "up exited with {status}: {}", self.log());
        assert!(!mounted(&self.mount), "still mounted after down");
        assert!(self.log().contains("blobstore unloaded"), "no clean unload: {}", self.log());
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
    std::fs::write(mnt.join("still"), b"ok").unwrap();
    up.down();
}

/// pjdfstest installed by `hack/deps.sh test` (in `$HOME/.cargo/bin` or on PATH).
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
    let up = Up::start(dir.path(), &image, &mnt).unwrap();
    let out = Command::new(bin).arg("-c").arg(&config).arg("-p").arg(&mnt).current_dir(&mnt).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let summary = text.lines().find(|l| l.starts_with("Summary:")).unwrap_or("no summary line").to_string();
    eprintln!("pjdfstest: {summary}");
    let failed: Vec<&str> = text.lines().filter(|l| l.trim_end().ends_with("FAILED")).collect();
    assert!(out.status.success() && summary.starts_with("Summary: 0 failed"), "{summary}\n{}", failed.join("\n"));
    up.down();
}
