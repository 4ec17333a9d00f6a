//! fs_* methods: a file system on a loaded blobstore, mounted through FUSE.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use blobfs::fs::raft::MetaOptions;
use blobfs::fs::state::POLICY_XATTR;
use blobfs::fs::{Cmd, Errno, FileSystem, Ino, KeySource, ROOT, XattrMode};
use blobfs::reduce::{ReduceError, ReducePolicy};
use pmd::rpc::{Allowed, Methods, RpcError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::app::App;

/// Parameters of `fs_mount`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MountParams {
    /// The bdev whose loaded blobstore holds (or will hold) the file system.
    pub bdev_name: String,
    /// An existing, empty directory to mount it on.
    pub mountpoint: PathBuf,
    /// Map unit of file data in bytes, for a new file system (default 4 KiB):
    /// a write replaces whole units, reading what it does not cover.
    /// Larger units make smaller maps and costlier small writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
    /// Write through the kernel's writeback cache (default false): much
    /// faster buffered writes; see docs/fs.md for what it changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub writeback_cache: bool,
    /// Serve requests over /dev/fuse only, even where the kernel offers
    /// per-CPU io_uring queues (Linux 6.14+ with the `fuse` module's
    /// `enable_uring` on; docs/fs.md, "Transports").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dev_fuse_only: bool,
    /// Master key of encrypted data: a file of 32 raw bytes or 64 hex
    /// digits. The first key a file system is given is the one it keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Master key of encrypted data from a passphrase (Argon2id): a file
    /// holding it (one trailing newline is not part of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
}

impl MountParams {
    /// The master key source the parameters name, if any.
    fn key(&self) -> Result<Option<KeySource>, RpcError> {
        match (&self.key_file, &self.passphrase_file) {
            (Some(_), Some(_)) => Err(RpcError::invalid_params("give key_file or passphrase_file, not both")),
            (Some(k), None) => Ok(Some(KeySource::File(k.clone()))),
            (None, Some(p)) => {
                let mut text = std::fs::read(p)
                    .map_err(|e| RpcError::invalid_params(format!("passphrase file {}: {e}", p.display())))?;
                if text.last() == Some(&b'\n') {
                    text.pop();
                }
                if text.is_empty() {
                    return Err(RpcError::invalid_params(format!("passphrase file {} is empty", p.display())));
                }
                Ok(Some(KeySource::Passphrase(text)))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Parameters naming a path in a mounted file system.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct PathRef {
    /// The mount point.
    mountpoint: PathBuf,
    /// A path within the file system, from its root (`/` or `""`: the root).
    path: String,
}

/// Parameters of `fs_set_reduce_policy`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetPolicy {
    /// The mount point.
    mountpoint: PathBuf,
    /// A directory (new files and directories under it take the policy) or
    /// an empty regular file, from the file system's root.
    path: String,
    /// The policy, e.g. `cdc:16k:64k:256k,lz4` or `fixed:64k,zstd:3,enc`
    /// (docs/reduce.md); null removes it (new files are stored plainly).
    policy: Option<String>,
}

/// Parameters of `reduce_audit`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    /// The mount point.
    mountpoint: PathBuf,
    /// Set reference counts that disagree with the files to what the files
    /// say (default false: only report).
    #[serde(default)]
    repair: bool,
}

/// Parameters naming a mount.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MountRef {
    /// The mount point.
    mountpoint: PathBuf,
}

struct Mount {
    params: MountParams,
    fs: Arc<FileSystem>,
    /// Unmounts when dropped.
    session: clients::fuse::Session,
}

/// Mounted file systems, and the runtime their requests run on.
#[derive(Default)]
pub struct FsState {
    mounts: Mutex<BTreeMap<PathBuf, Mount>>,
    /// Mount points and bdevs of mounts still opening ([`FsState::claim`]).
    opening: Mutex<BTreeSet<(PathBuf, String)>>,
    runtime: OnceLock<tokio::runtime::Runtime>,
}

/// A mount point and bdev held for a mount until it is in the table (or
/// has failed).
struct Claim<'a> {
    state: &'a FsState,
    key: (PathBuf, String),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.state.opening.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

impl FsState {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Mount>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `path` and the file system on `bdev` for a new mount, refusing
    /// either if a mount (or one still opening) has it already. A file
    /// system opened twice would be two metadata groups writing one log,
    /// each blind to the other's files: a second path to one file system
    /// is a bind mount of the first.
    fn claim(&self, path: &Path, bdev: &str) -> Result<Claim<'_>, RpcError> {
        let mounts = self.lock();
        let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if mounts.contains_key(path) || opening.iter().any(|(p, _)| p == path) {
            return Err(RpcError::errno(libc::EBUSY, format!("{} is already mounted", path.display())));
        }
        if let Some(at) = holder(&mounts, &opening, bdev) {
            return Err(RpcError::errno(
                libc::EBUSY,
                format!(
                    "the file system on bdev {bdev} is already mounted on {}; for a second path to it, \
                     bind-mount that one (mount --bind)",
                    at.display()
                ),
            ));
        }
        let key = (path.to_path_buf(), bdev.to_string());
        opening.insert(key.clone());
        Ok(Claim { state: self, key })
    }

    /// Where the file system on `bdev` is mounted (or being mounted), if it is.
    pub fn mounted_from(&self, bdev: &str) -> Option<PathBuf> {
        holder(&self.lock(), &self.opening.lock().unwrap_or_else(|p| p.into_inner()), bdev)
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime, RpcError> {
        if let Some(rt) = self.runtime.get() {
            return Ok(rt);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("claudefs-fs")
            .enable_all()
            .build()
            .map_err(|e| RpcError::errno(libc::EIO, format!("starting the file system runtime: {e}")))?;
        Ok(self.runtime.get_or_init(|| rt))
    }

    /// `f` of each mount, an object, with its mount point added.
    fn per_mount(&self, f: impl Fn(&Mount) -> Value) -> Vec<Value> {
        self.lock()
            .iter()
            .map(|(path, m)| {
                let mut v = f(m);
                v["mountpoint"] = json!(path);
                v
            })
            .collect()
    }

    /// The `fs_mount` calls that recreate the mounts (for save_config).
    pub fn config(&self) -> Vec<Value> {
        self.lock().values().map(|m| json!({ "method": "fs_mount", "params": m.params })).collect()
    }

    /// Unmounts everything and stops the file systems (at shutdown).
    /// A mount that is busy (a file open on it, a working directory in
    /// it) is detached and its FUSE connection aborted: the server is going
    /// away, and what those processes do next gets ENOTCONN.
    pub async fn unmount_all(&self) {
        let mounts: Vec<(PathBuf, Mount)> = std::mem::take(&mut *self.lock()).into_iter().collect();
        for (path, m) in mounts {
            match unmount(&path) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::warn!(
                        "{}: busy at shutdown; detaching it (its open files get ENOTCONN from now on)",
                        path.display()
                    );
                    if let Err(e) = force_unmount(&path) {
                        tracing::error!("detaching {}: {e}", path.display());
                    }
                }
                Err(e) => tracing::error!("unmounting {}: {e}", path.display()),
                Ok(()) => {}
            }
            if let Err(e) = stop(m).await {
                tracing::error!("stopping the file system of {}: {e}", path.display());
            }
        }
    }
}

/// The mount point of the mount, or mount still opening, of `bdev`'s file system.
fn holder(mounts: &BTreeMap<PathBuf, Mount>, opening: &BTreeSet<(PathBuf, String)>, bdev: &str) -> Option<PathBuf> {
    let mut held = mounts.iter().map(|(p, m)| (p, &m.params.bdev_name)).chain(opening.iter().map(|(p, b)| (p, b)));
    held.find(|(_, b)| *b == bdev).map(|(p, _)| p.clone())
}

/// Once the kernel's mount is gone ([`unmount`]): waits for the session's
/// threads to finish what the kernel sent before, then syncs and stops the
/// file system.
async fn stop(m: Mount) -> Result<(), RpcError> {
    let Mount { fs, session, .. } = m;
    tokio::task::spawn_blocking(move || session.join())
        .await
        .map_err(|e| RpcError::errno(libc::EIO, format!("unmounting: {e}")))?
        .map_err(|e| RpcError::errno(e.raw_os_error().unwrap_or(libc::EIO), format!("unmounting: {e}")))?;
    fs.shutdown().await.map_err(|e| RpcError::errno(e.0, format!("stopping the file system: {e}")))
}

/// Unmounts ClaudeFS's mount on `path` (canonical): EBUSY, and the mount
/// stays, while a process has a file open or its working directory on it.
/// A mount already gone (unmounted by hand) is fine; whatever else is
/// mounted on `path` now is left alone.
fn unmount(path: &Path) -> std::io::Result<()> {
    if !mount_type(path).is_some_and(|(fstype, source)| fstype.starts_with("fuse") && source == "claudefs") {
        return Ok(());
    }
    umount2(path, 0)
}

/// Detaches the mount on `path` and aborts its FUSE connection, so that the
/// session ends now rather than when the last file open on it is closed.
fn force_unmount(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    umount2(path, libc::MNT_DETACH)?;
    // The kernel names a FUSE connection by its device's minor number, in
    // the fusectl file system (which systemd mounts; mounted here if not).
    let dir = Path::new("/sys/fs/fuse/connections");
    let conn = dir.join(libc::minor(dev).to_string());
    if !conn.exists() {
        // SAFETY: the strings are NUL-terminated literals; mount(2) reads
        // them and touches no memory of ours.
        let r = unsafe {
            libc::mount(
                c"fusectl".as_ptr(),
                c"/sys/fs/fuse/connections".as_ptr(),
                c"fusectl".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), format!("mounting fusectl on {}: {e}", dir.display())));
        }
    }
    std::fs::write(conn.join("abort"), b"1")
}

/// Refuses a mount point that is missing, not a directory, not empty, or
/// already a mount point, naming which.
fn check_mountpoint(path: &Path) -> Result<PathBuf, RpcError> {
    let bad = |errno, what: &str| Err(RpcError::errno(errno, format!("mount point {}: {what}", path.display())));
    if server_gone(path)
        && mount_type(path).is_some_and(|(fstype, source)| fstype.starts_with("fuse") && source == "claudefs")
    {
        // A ClaudeFS mount whose server died (kill -9, a crash): the kernel
        // keeps it until it is unmounted. Detach it, as a restart expects.
        tracing::warn!("{}: a ClaudeFS mount left by a server that is gone; detaching it", path.display());
        umount2(path, libc::MNT_DETACH).map_err(|e| {
            RpcError::errno(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("detaching the stale mount on {}: {e}", path.display()),
            )
        })?;
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return bad(libc::ENOENT, "does not exist"),
        Err(e) => return bad(e.raw_os_error().unwrap_or(libc::EIO), &e.to_string()),
    };
    if !meta.is_dir() {
        return bad(libc::ENOTDIR, "is not a directory");
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| RpcError::errno(libc::EIO, e.to_string()))?;
    if is_mount_point(&canonical) {
        return bad(libc::EBUSY, "is already a mount point");
    }
    match std::fs::read_dir(path).map(|mut d| d.next().is_some()) {
        Ok(true) => bad(libc::ENOTEMPTY, "is not empty"),
        Ok(false) => Ok(canonical),
        Err(e) => bad(e.raw_os_error().unwrap_or(libc::EIO), &e.to_string()),
    }
}

/// Whether the FUSE mount on `path` has lost its server: statfs says
/// ENOTCONN. (statfs always asks the server; stat may be answered from the
/// kernel's attribute cache for a while after the server died.)
fn server_gone(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statvfs is plain data, for which all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs,
    // both outliving the call.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Whether `path` (canonical) is a mount point.
fn is_mount_point(path: &Path) -> bool {
    mount_type(path).is_some()
}

/// The file system type and source of the mount on `path`, by
/// /proc/self/mountinfo (the last one, if several are stacked).
fn mount_type(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Field 5 is the mount point (spaces octal-escaped); the type follows " - ".
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .filter_map(|l| {
            let mut tail = l.split(" - ").nth(1)?.split(' ');
            Some((tail.next()?.to_string(), tail.next()?.to_string()))
        })
        .next_back()
}

/// umount2(2) of `path` with `flags` (MNT_DETACH: `umount -l`).
fn umount2(path: &Path, flags: i32) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call;
    // umount2 reads it and touches no memory of ours.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The file system mounted on `mountpoint`.
fn mounted(app: &App, mountpoint: &Path) -> Result<Arc<FileSystem>, RpcError> {
    let path = std::fs::canonicalize(mountpoint).unwrap_or(mountpoint.to_path_buf());
    app.fs.lock().get(&path).map(|m| m.fs.clone()).ok_or_else(|| {
        RpcError::errno(libc::ENOENT, format!("no ClaudeFS file system is mounted on {}", path.display()))
    })
}

/// The file system mounted on `mountpoint` and the inode `path` names in it.
fn at_path(app: &App, mountpoint: &Path, path: &str) -> Result<(Arc<FileSystem>, Ino), RpcError> {
    let fs = mounted(app, mountpoint)?;
    let ino = resolve(&fs, path)?;
    Ok((fs, ino))
}

/// The policy xattr of `ino`, if it has one.
fn policy_of(fs: &FileSystem, ino: Ino) -> Option<String> {
    fs.meta().read(|s| s.getxattr(ino, POLICY_XATTR).ok().map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// The inode `path` names, from the file system's root (no symlinks followed).
fn resolve(fs: &FileSystem, path: &str) -> Result<Ino, RpcError> {
    let mut ino = ROOT;
    for name in path.split('/').filter(|n| !n.is_empty() && *n != ".") {
        ino = fs.meta().read(|s| s.lookup(ino, name.as_bytes()).map(|a| a.ino)).map_err(|e| {
            RpcError::errno(e.0, format!("path {path:?}: {name:?}: {}", std::io::Error::from_raw_os_error(e.0)))
        })?;
    }
    Ok(ino)
}

fn errno_err(what: &str, e: Errno) -> RpcError {
    RpcError::errno(e.0, format!("{what}: {}", std::io::Error::from_raw_os_error(e.0)))
}

fn fs_err(e: blobfs::BlobError) -> RpcError {
    RpcError::errno(e.errno(), e.to_string())
}

pub fn register(m: &mut Methods, app: &Arc<App>) {
    let a = app.clone();
    m.add(
        "fs_mount",
        "Open the file system on a loaded blobstore (creating an empty one if the store holds none) and mount it \
         through FUSE on an empty directory.",
        Allowed::Runtime,
        move |p: MountParams| {
            let a = a.clone();
            async move {
                let path = check_mountpoint(&p.mountpoint)?;
                let _claim = a.fs.claim(&path, &p.bdev_name)?;
                let store = a.blobstore(&p.bdev_name)?;
                let rt = a.fs.runtime()?;
                let reactors = a.reactors.to_vec();
                let opts = MetaOptions {
                    chunk_size: p.chunk_size.unwrap_or(MetaOptions::default().chunk_size),
                    ..Default::default()
                };
                if opts.chunk_size < 4096 || opts.chunk_size % 4096 != 0 || opts.chunk_size > 64 << 20 {
                    return Err(RpcError::invalid_params(format!(
                        "chunk_size {} is not a multiple of 4096 from 4 KiB to 64 MiB",
                        opts.chunk_size
                    )));
                }
                let key = p.key()?;
                let fs = rt
                    .spawn(async move { FileSystem::open_keyed(&store, reactors, opts, key).await })
                    .await
                    .map_err(|e| RpcError::errno(libc::EIO, e.to_string()))?
                    .map_err(fs_err)?;
                let fs = Arc::new(fs);
                {
                    let _runtime = rt.enter();
                    fs.start_gc();
                }
                let fuse = Arc::new(clients::fuse::Fuse::new(fs.clone(), rt.handle().clone(), p.writeback_cache));
                let opts = clients::fuse::MountOptions { ring: !p.dev_fuse_only, ..Default::default() };
                let session = clients::fuse::Session::mount(&path, fuse, &opts).map_err(|e| {
                    RpcError::errno(e.raw_os_error().unwrap_or(libc::EIO), format!("mounting {}: {e}", path.display()))
                })?;
                clients::fuse::tune(&path);
                tracing::info!(bdev = p.bdev_name, "file system mounted on {}", path.display());
                let out = json!({ "mountpoint": path, "bdev_name": p.bdev_name });
                a.fs.lock().insert(path, Mount { params: p, fs, session });
                Ok(out)
            }
        },
    );
    let a = app.clone();
    m.add(
        "fs_umount",
        "Unmount a file system, make everything durable and stop it.",
        Allowed::Runtime,
        move |p: MountRef| {
            let a = a.clone();
            async move {
                let path = std::fs::canonicalize(&p.mountpoint).unwrap_or(p.mountpoint.clone());
                let none = || {
                    RpcError::errno(libc::ENOENT, format!("no ClaudeFS file system is mounted on {}", path.display()))
                };
                if !a.fs.lock().contains_key(&path) {
                    return Err(none());
                }
                // A busy mount stays mounted and served, as umount(8) leaves it.
                unmount(&path).map_err(|e| match e.raw_os_error() {
                    Some(libc::EBUSY) => RpcError::errno(
                        libc::EBUSY,
                        format!(
                            "{} is busy: a process has a file open or its working directory there; it stays mounted",
                            path.display()
                        ),
                    ),
                    errno => RpcError::errno(errno.unwrap_or(libc::EIO), format!("unmounting {}: {e}", path.display())),
                })?;
                let m = a.fs.lock().remove(&path).ok_or_else(none)?;
                stop(m).await?;
                Ok(true)
            }
        },
    );
    let a = app.clone();
    m.add("fs_get_mounts", "Mounted file systems: mount point, bdev, and how FUSE requests arrive (`fuse_transport`: `io_uring` or `/dev/fuse`).", Allowed::Always, move |_: Value| {
        let mounts: Vec<Value> =
            a.fs.lock()
                .iter()
                .map(|(path, m)| {
                    let transport = if m.session.ring() { "io_uring" } else { "/dev/fuse" };
                    json!({ "mountpoint": path, "bdev_name": m.params.bdev_name, "fuse_transport": transport })
                })
                .collect();
        async move { Ok(mounts) }
    });
    let a = app.clone();
    m.add(
        "fs_get_stats",
        "Per mounted file system: inodes, bytes of file data, free and total space, chunk size, and data-reduction statistics (`reduce`: logical and stored bytes, ratios, garbage collection).",
        Allowed::Always,
        move |_: Value| {
            let stats = a.fs.per_mount(|m| {
                let (pages, free) = m.fs.space();
                let (usage, chunk) = m.fs.meta().read(|s| (s.usage(), s.chunk_size()));
                json!({
                    "bdev_name": m.params.bdev_name,
                    "inodes": usage.inodes,
                    "data_bytes": usage.data_pages * 4096,
                    "free_bytes": free * 4096,
                    "total_bytes": pages * 4096,
                    "chunk_size": chunk,
                    "reduce": m.fs.reduce_stats(),
                })
            });
            async move { Ok(stats) }
        },
    );
    let a = app.clone();
    m.add(
        "fs_set_reduce_policy",
        "Set (or, with a null policy, remove) the data-reduction policy of a directory, which new files and \
         directories under it take, or of an empty regular file (the claudefs.reduce xattr).",
        Allowed::Runtime,
        move |p: SetPolicy| {
            let a = a.clone();
            async move {
                let (fs, ino) = at_path(&a, &p.mountpoint, &p.path)?;
                let name = POLICY_XATTR.to_vec();
                let now = blobfs::fs::Time::now();
                let cmd = match &p.policy {
                    Some(text) => {
                        let policy: ReducePolicy =
                            text.parse().map_err(|e: ReduceError| RpcError::invalid_params(e.to_string()))?;
                        let value = policy.to_string().into_bytes();
                        Cmd::SetXattr { ino, name, value, mode: XattrMode::Upsert, now }
                    }
                    None => Cmd::RemoveXattr { ino, name, now },
                };
                match fs.apply(cmd).await {
                    Ok(_) | Err(Errno::ENODATA) if p.policy.is_none() => Ok(Value::Null),
                    Ok(_) => Ok(json!(policy_of(&fs, ino))),
                    Err(Errno::EBUSY) => Err(RpcError::errno(
                        libc::EBUSY,
                        format!(
                            "{}: a file's layout is chosen at its creation; only an empty file takes a policy",
                            p.path
                        ),
                    )),
                    Err(e) if e.0 == libc::ENOKEY => Err(RpcError::errno(
                        e.0,
                        "a policy that encrypts needs the file system mounted with a master key \
                         (key_file or passphrase_file)",
                    )),
                    Err(e) => Err(errno_err(&p.path, e)),
                }
            }
        },
    );
    let a = app.clone();
    m.add(
        "fs_get_reduce_policy",
        "The data-reduction policy of a file or directory (null: none), and whether a file's data is reduced.",
        Allowed::Always,
        move |p: PathRef| {
            let a = a.clone();
            async move {
                let (fs, ino) = at_path(&a, &p.mountpoint, &p.path)?;
                let reduced = fs.meta().read(|s| s.is_reduced(ino)).map_err(|e| errno_err(&p.path, e))?;
                Ok(json!({ "policy": policy_of(&fs, ino), "reduced": reduced }))
            }
        },
    );
    let a = app.clone();
    m.add(
        "fs_get_reduce_stats",
        "Per mounted file system: logical and stored bytes, dedupe, compression and overall reduction ratios, \
         garbage collection progress.",
        Allowed::Always,
        move |_: Value| {
            let stats = a.fs.per_mount(|m| serde_json::to_value(m.fs.reduce_stats()).unwrap_or_default());
            async move { Ok(stats) }
        },
    );
    let a = app.clone();
    m.add(
        "reduce_audit",
        "Walk every reduced file and the dedupe index: check reference counts and decode every stored chunk, \
         reporting discrepancies (and, with repair, setting wrong counts to what the files say).",
        Allowed::Runtime,
        move |p: AuditParams| {
            let a = a.clone();
            async move {
                let fs = mounted(&a, &p.mountpoint)?;
                let rt = a.fs.runtime()?;
                let report = rt
                    .spawn(async move { fs.reduce_audit(p.repair).await })
                    .await
                    .map_err(|e| RpcError::errno(libc::EIO, e.to_string()))?
                    .map_err(|e| errno_err("reduce audit", e))?;
                let clean = report.clean();
                let mut v = serde_json::to_value(&report).unwrap_or_default();
                v["clean"] = json!(clean);
                Ok(v)
            }
        },
    );
}
