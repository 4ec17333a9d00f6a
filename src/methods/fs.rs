//! fs_* methods: a file system on a loaded blobstore, mounted through FUSE.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use blobfs::fs::FileSystem;
use blobfs::fs::raft::MetaOptions;
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
    session: fuser::BackgroundSession,
}

/// Mounted file systems, and the runtime their requests run on.
#[derive(Default)]
pub struct FsState {
    mounts: Mutex<BTreeMap<PathBuf, Mount>>,
    runtime: OnceLock<tokio::runtime::Runtime>,
}

impl FsState {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Mount>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
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

    /// The `fs_mount` calls that recreate the mounts (for save_config).
    pub fn config(&self) -> Vec<Value> {
        self.lock().values().map(|m| json!({ "method": "fs_mount", "params": m.params })).collect()
    }

    /// Unmounts everything and stops the file systems (at shutdown).
    pub async fn unmount_all(&self) {
        let mounts: Vec<(PathBuf, Mount)> = std::mem::take(&mut *self.lock()).into_iter().collect();
        for (path, m) in mounts {
            if let Err(e) = stop(m).await {
                tracing::error!("unmounting {}: {e}", path.display());
            }
        }
    }
}

/// Unmounts, then syncs and stops the file system.
async fn stop(m: Mount) -> Result<(), RpcError> {
    let Mount { fs, session, .. } = m;
    // Unmount, then wait for the session's threads to finish what the
    // kernel sent before.
    tokio::task::spawn_blocking(move || session.umount_and_join())
        .await
        .map_err(|e| RpcError::errno(libc::EIO, format!("unmounting: {e}")))?
        .map_err(|e| RpcError::errno(e.raw_os_error().unwrap_or(libc::EIO), format!("unmounting: {e}")))?;
    fs.shutdown().await.map_err(|e| RpcError::errno(e.0, format!("stopping the file system: {e}")))
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
        detach(path).map_err(|e| {
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

/// Lazily unmounts `path` (`umount -l`).
fn detach(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call;
    // umount2 reads it and touches no memory of ours.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
                if a.fs.lock().contains_key(&path) {
                    return Err(RpcError::errno(libc::EBUSY, format!("{} is already mounted", path.display())));
                }
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
                let fs = rt
                    .spawn(async move { FileSystem::open(&store, reactors, opts).await })
                    .await
                    .map_err(|e| RpcError::errno(libc::EIO, e.to_string()))?
                    .map_err(fs_err)?;
                let fs = Arc::new(fs);
                let fuse = clients::fuse::Fuse::new(fs.clone(), rt.handle().clone(), p.writeback_cache);
                let config = clients::fuse::mount_config();
                let session = fuser::spawn_mount(fuse, &path, &config).map_err(|e| {
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
                let m = a.fs.lock().remove(&path).ok_or_else(|| {
                    RpcError::errno(libc::ENOENT, format!("no ClaudeFS file system is mounted on {}", path.display()))
                })?;
                stop(m).await?;
                Ok(true)
            }
        },
    );
    let a = app.clone();
    m.add("fs_get_mounts", "Mounted file systems: mount point and bdev.", Allowed::Always, move |_: Value| {
        let mounts: Vec<Value> =
            a.fs.lock()
                .iter()
                .map(|(path, m)| json!({ "mountpoint": path, "bdev_name": m.params.bdev_name }))
                .collect();
        async move { Ok(mounts) }
    });
    let a = app.clone();
    m.add(
        "fs_get_stats",
        "Per mounted file system: inodes, bytes of file data, free and total space, chunk size.",
        Allowed::Always,
        move |_: Value| {
            let stats: Vec<Value> =
                a.fs.lock()
                    .iter()
                    .map(|(path, m)| {
                        let (pages, free) = m.fs.space();
                        let (usage, chunk) = m.fs.meta().read(|s| (s.usage(), s.chunk_size()));
                        json!({
                            "mountpoint": path,
                            "bdev_name": m.params.bdev_name,
                            "inodes": usage.inodes,
                            "data_bytes": usage.data_pages * 4096,
                            "free_bytes": free * 4096,
                            "total_bytes": pages * 4096,
                            "chunk_size": chunk,
                        })
                    })
                    .collect();
            async move { Ok(stats) }
        },
    );
}
