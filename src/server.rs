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
        server.serve(shutdown_signal(app.clone())).await;
        app.fs.unmount_all().await;
        app.unload_blobstores().await;
        anyhow::Ok(())
    });
    runtime.shutdown();
    tracing::info!("server stopped");
    result
}

/// Completes on SIGINT, SIGTERM or framework_shutdown.
async fn shutdown_signal(app: Arc<App>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut int, mut term) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            tracing::warn!("cannot install signal handlers; only framework_shutdown stops the server");
            app.shutdown.notified().await;
            return;
        }
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = app.shutdown.notified() => tracing::info!("framework_shutdown: shutting down"),
    }
}
