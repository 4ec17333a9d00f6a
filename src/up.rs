//! `claudefs up`, `down`, `mount` and `umount`: the single-node ClaudeFS as
//! one command, and its mount managed through the control socket.
//!
//! `up` is a server whose startup config it writes itself: a uring bdev on
//! the image file (created if absent), the blobstore on it (formatted if the
//! image has never been written, loaded otherwise: a damaged image is
//! refused with what is wrong, never formatted over), and the file system
//! mounted on the given directory. Ctrl-C, SIGTERM or `claudefs down`
//! unmount it, make everything durable and unload the store.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use crate::app::ConfigCall;
use crate::server::ServerArgs;

/// Options of `claudefs up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Image file holding the file system (created, written in full, if
    /// absent).
    #[arg(long, default_value = "/var/tmp/claudefs/disk0.img")]
    pub image: PathBuf,
    /// Create a new image sparse instead: quick, but every first write to a
    /// block of it then makes the host file system allocate (slower, and
    /// the host may run out of space under the store).
    #[arg(long)]
    pub sparse: bool,
    /// Size of a new image: bytes, or with k, m, g, t.
    #[arg(long, default_value = "1g", value_parser = parse_size)]
    pub size: u64,
    /// Where to mount: an existing, empty directory.
    #[arg(long, default_value = "/mnt/claudefs")]
    pub mount: PathBuf,
    /// Control socket path.
    #[arg(short = 'r', long = "rpc-socket", default_value = pmd::rpc::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Cores to run reactors on: hex mask (0x3) or list ([0,2-3]).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    pub mask: String,
    /// Reactor idle policy: adaptive (sleep when idle) or always (poll
    /// without pause: lowest latency, a whole core per reactor).
    #[arg(long, default_value = "adaptive")]
    pub idle: pmd::IdlePolicy,
    /// Under the adaptive policy, microseconds without work before a reactor sleeps.
    #[arg(long, default_value_t = 200)]
    pub spin_us: u64,
    /// Write through the kernel's writeback cache (faster buffered writes;
    /// docs/fs.md says what it changes).
    #[arg(long)]
    pub writeback_cache: bool,
    /// Serve FUSE requests over /dev/fuse only, even where the kernel
    /// offers per-CPU io_uring queues (docs/fs.md, "Transports").
    #[arg(long)]
    pub dev_fuse_only: bool,
    /// Master key of encrypted data: a file of 32 raw bytes or 64 hex
    /// digits (`head -c 32 /dev/urandom > key`). The first key a file
    /// system is given is the one it keeps (docs/reduce.md).
    #[arg(long, conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// Master key of encrypted data from a passphrase (Argon2id), read
    /// from this file.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

/// Parses `4096`, `512m`, `1g`, `2T`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, shift) = match t.strip_suffix(['k', 'm', 'g', 't']) {
        Some(d) => (d, 10 * (1 + "kmgt".find(t.chars().last().unwrap_or('k')).unwrap_or(0) as u32)),
        None => (t.as_str(), 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (bytes, or a number with k, m, g or t)"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s:?} is too large"))
}

/// Creates `image` with `size` bytes allocated and written (zeros), so the
/// host file system backs every block before the store writes any: writes
/// into a sparse or merely preallocated file make the host allocate or
/// convert extents, and flushes then wait for its journal (on ext4, a 4 KiB
/// write took 2-5 times as long). A failure removes the file.
fn write_image(image: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let what = || format!("writing the new image {} ({size} bytes)", image.display());
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(image).with_context(what)?;
    let filled = (|| {
        let len = libc::off_t::try_from(size).map_err(std::io::Error::other)?;
        // SAFETY: the fd is open for writing; fallocate reads no memory of ours.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e); // ENOSPC, above all: said now rather than by a failed write later
            }
        }
        let zeros = vec![0u8; 8 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_data()?;
        // SAFETY: as above; advice only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    })();
    if let Err(e) = filled {
        drop(f);
        let _ = std::fs::remove_file(image);
        return Err(e).with_context(what);
    }
    Ok(())
}

/// Whether the image's first MiB has never been written (all zeros).
fn never_written(image: &Path) -> anyhow::Result<bool> {
    let mut f = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut head = vec![0u8; 1 << 20];
    let n = f.read(&mut head).with_context(|| format!("reading {}", image.display()))?;
    Ok(head[..n].iter().all(|&b| b == 0))
}

pub fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let created = !args.image.exists();
    if created {
        if let Some(dir) = args.image.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        anyhow::ensure!(
            args.size >= 64 << 20,
            "--size {} is too small: a file system needs at least 64 MiB",
            args.size
        );
    }
    let mut uring = json!({ "name": "Uring0", "filename": args.image });
    if created && args.sparse {
        uring["size"] = json!(args.size);
    } else if created {
        write_image(&args.image, args.size)?;
    }
    let format = created || never_written(&args.image)?;
    // Each call, with what it is in the words of a failure.
    let call = |method: &str, params: Option<serde_json::Value>, step: String| {
        (ConfigCall { method: method.into(), params }, step)
    };
    let (calls, steps): (Vec<ConfigCall>, Vec<String>) = [
        call("framework_start_init", None, "starting the server".into()),
        call("bdev_uring_create", Some(uring), format!("opening the image {}", args.image.display())),
        call(
            if format { "blobstore_create" } else { "blobstore_load" },
            Some(json!({ "bdev_name": "Uring0" })),
            format!("{} the file system on {}", if format { "formatting" } else { "loading" }, args.image.display()),
        ),
        call(
            "fs_mount",
            Some(json!({
                "bdev_name": "Uring0",
                "mountpoint": args.mount,
                "writeback_cache": args.writeback_cache,
                "dev_fuse_only": args.dev_fuse_only,
                "key_file": args.key_file.as_ref().map(|p| std::path::absolute(p).unwrap_or(p.clone())),
                "passphrase_file": args.passphrase_file.as_ref().map(|p| std::path::absolute(p).unwrap_or(p.clone())),
            })),
            format!("mounting on {}", args.mount.display()),
        ),
    ]
    .into_iter()
    .unzip();
    let server = ServerArgs {
        config: None,
        mask: args.mask,
        socket: args.socket,
        wait_for_rpc: false,
        idle: args.idle,
        spin_us: args.spin_us,
        hugepages: pmd::dma::HugepageMode::Auto,
        mem_size_mib: None,
        max_request: pmd::rpc::DEFAULT_MAX_REQUEST,
    };
    crate::server::run_with(server, Some(calls)).map(|()| ExitCode::SUCCESS).map_err(|e| match e
        .downcast_ref::<crate::app::ConfigError>()
    {
        Some(c) => {
            // Startup failed: an image made just now holds nothing yet.
            if created {
                let _ = std::fs::remove_file(&args.image);
            }
            anyhow::anyhow!("{}: {}", steps[c.index - 1], c.error)
        }
        None => e,
    })
}
