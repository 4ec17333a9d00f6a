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
    /// Image file holding the file system (created, sparse, if absent).
    #[arg(long, default_value = "/var/tmp/claudefs/disk0.img")]
    pub image: PathBuf,
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
    /// Write through the kernel's writeback cache (faster buffered writes;
    /// docs/fs.md says what it changes).
    #[arg(long)]
    pub writeback_cache: bool,
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
    if created {
        uring["size"] = json!(args.size);
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
            Some(json!({ "bdev_name": "Uring0", "mountpoint": args.mount, "writeback_cache": args.writeback_cache })),
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
        idle: pmd::IdlePolicy::Adaptive,
        spin_us: 200,
        hugepages: pmd::dma::HugepageMode::Auto,
        mem_size_mib: None,
        max_request: pmd::rpc::DEFAULT_MAX_REQUEST,
    };
    crate::server::run_with(server, Some(calls)).map(|()| ExitCode::SUCCESS).map_err(|e| match e
        .downcast_ref::<crate::app::ConfigError>()
    {
        Some(c) => anyhow::anyhow!("{}: {}", steps[c.index - 1], c.error),
        None => e,
    })
}
