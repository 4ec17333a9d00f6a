//! `claudefs server`: reactors, bdevs and the control socket (SPDK's spdk_tgt).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use pmd::dma::{DmaOptions, HugepageMode};
use pmd::rpc::{DEFAULT_MAX_REQUEST, RpcServer};
use pmd::{CoreMask, IdlePolicy, Runtime, RuntimeOptions};

use crate::app::{App, read_config, replay};

/// Options of `claudefs server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Startup config: a JSON list of method calls, as save_config writes.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Cores to run reactors on: hex mask (0x3) or list ([0,2-3]).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    pub mask: String,
    /// Control socket path.
    #[arg(short = 'r', long = "rpc-socket", default_value = pmd::rpc::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Wait for framework_start_init before initialising (and before config calls that need it).
    #[arg(long)]
    pub wait_for_rpc: bool,
    /// Reactor idle policy: adaptive (sleep when idle) or always (poll without pause).
    #[arg(long, default_value = "adaptive")]
    pub idle: IdlePolicy,
    /// Under the adaptive policy, microseconds without work before a reactor sleeps.
    #[arg(long, default_value_t = 200)]
    pub spin_us: u64,
    /// DMA memory: auto (hugepages if reserved), require, or never.
    #[arg(long, default_value = "auto", value_parser = parse_hugepages)]
    pub hugepages: HugepageMode,
    /// Upper bound on DMA memory in MiB.
    #[arg(short = 's', long = "mem-size")]
    pub mem_size_mib: Option<u64>,
    /// Largest JSON-RPC request accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_REQUEST)]
    pub max_request: usize,
}

pub fn parse_hugepages(s: &str) -> Result<HugepageMode, String> {
    match s {
        "auto" => Ok(HugepageMode::Auto),
        "require" => Ok(HugepageMode::Require),
        "never" => Ok(HugepageMode::Never),
        other => Err(format!("unknown hugepage mode {other:?}: use auto, require or never")),
    }
}

/// Starts reactors for `mask` with DMA options set; shared with bdevperf.
pub fn start_runtime(
    mask: &str,
    idle: IdlePolicy,
    spin_us: u64,
    hugepages: HugepageMode,
    mem_size_mib: Option<u64>,
) -> anyhow::Result<(Runtime, CoreMask)> {
    let mask = CoreMask::parse_available(mask)?;
    pmd::dma::init(DmaOptions { hugepages, max_bytes: mem_size_mib.map(|m| m << 20) })?;
    let runtime = Runtime::start(RuntimeOptions { mask: mask.clone(), idle, spin_us, ..Default::default() })?;
    Ok((runtime, mask))
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    // Check everything that can be checked before anything starts.
    let calls = args.config.as_deref().map(read_config).transpose()?;
    run_with(args, calls)
}

/// Runs a server that replays `calls` (the startup config) first.
pub fn run_with(args: ServerArgs, calls: Option<Vec<crate::app::ConfigCall>>) -> anyhow::Result<()> {
    let signals = StopSignals::block().context("blocking SIGINT and SIGTERM")?;
    let (runtime, mask) = start_runtime(&args.mask, args.idle, args.spin_us, args.hugepages, args.mem_size_mib)?;
    let app = App::new(runtime.reactors().clone(), mask, args.idle);
    let methods = crate::methods::build(&app);
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the control runtime")?;
    let result = rt.block_on(async {
        let server = RpcServer::bind(&args.socket, methods.clone(), args.max_request)?;
        match calls {
            Some(calls) => {
                replay(&app, &methods, calls, args.wait_for_rpc).await.with_context(|| match &args.config {
                    Some(path) => format!("loading config {}", path.display()),
                    None => "starting up".to_string(),
                })?
            }
            None if !args.wait_for_rpc => {
                app.init();
            }
            None => tracing::info!("waiting for framework_start_init"),
        }
        println!("claudefs server ready: control socket {} (reactors on cores {})", server.path().display(), app.mask);
        server.serve(shutdown_signal(app.clone(), signals)).await;
        app.fs.unmount_all().await;
        app.unload_blobstores().await;
        anyhow::Ok(())
    });
    runtime.shutdown();
    tracing::info!("server stopped");
    result
}

/// Completes on SIGINT, SIGTERM or framework_shutdown.
async fn shutdown_signal(app: Arc<App>, signals: StopSignals) {
    tokio::select! {
        signal = signals.next() => match signal {
            Ok(name) => tracing::info!("{name}: shutting down"),
            Err(e) => {
                tracing::warn!("reading signals failed ({e}); only framework_shutdown stops the server now");
                app.shutdown.notified().await;
            }
        },
        _ = app.shutdown.notified() => tracing::info!("framework_shutdown: shutting down"),
    }
}

/// SIGINT and SIGTERM, blocked in every thread and read from a signalfd.
///
/// Not signal handlers: libfabric links libinfinipath (PSM), whose load-time
/// constructor installs SIGINT/SIGTERM handlers that call `exit(1)`, and a
/// handler of ours would chain to theirs (the server would vanish without
/// unmounting or unloading). Blocked signals run no handler at all. The mask
/// is set before any thread starts, so every thread inherits it; child
/// processes start with an empty mask (std resets it).
struct StopSignals(std::os::fd::OwnedFd);

impl StopSignals {
    fn block() -> std::io::Result<StopSignals> {
        use std::os::fd::FromRawFd;
        // SAFETY: sigset_t is plain data that sigemptyset initialises; the
        // pointers passed are to that live local.
        let set = unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            set
        };
        // SAFETY: `set` is initialised; the old mask is not asked for.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: a new signalfd for an initialised set; we own the fd it returns.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(StopSignals(fd))
    }

    /// Waits for a signal (in a tokio runtime); its name.
    async fn next(self) -> std::io::Result<&'static str> {
        use std::os::fd::AsRawFd;
        // SAFETY: the AsyncFd owns the fd, which stays open as long as it does.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(self.0, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        loop {
            let mut guard = fd.readable().await?;
            let mut info = std::mem::MaybeUninit::<libc::signalfd_siginfo>::uninit();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads at most `size` bytes into `info`, which has that size.
            let n = unsafe { libc::read(fd.get_ref().as_raw_fd(), info.as_mut_ptr().cast(), size) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(e);
            }
            // SAFETY: the kernel wrote a whole signalfd_siginfo (reads are all or nothing).
            let signo = unsafe { info.assume_init() }.ssi_signo as i32;
            return Ok(if signo == libc::SIGINT { "SIGINT" } else { "SIGTERM" });
        }
    }
}
