//! `claudefs`: the one binary that wires ClaudeFS together.
//!
//! - `claudefs server`: reactors, bdevs and the JSON-RPC control socket;
//! - `claudefs rpc METHOD [params]`: the control client;
//! - `claudefs bdevperf`: the bdev benchmark and verifier;
//! - `claudefs fabricperf`: the fabric RPC benchmark;
//! - `claudefs reduceperf`: the data-reduction stages and pipeline.

mod app;
mod bdevperf;
mod blobperf;
mod fabricperf;
mod methods;
mod reduceperf;
mod server;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "claudefs",
    version,
    about = "ClaudeFS: a userspace, polled-mode distributed file system for NVMe servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server: reactors, bdevs and the control socket.
    Server(server::ServerArgs),
    /// Start a single-node ClaudeFS on an image file and mount it (Ctrl-C or `claudefs down` stops it).
    Up(up::UpArgs),
    /// Stop the server behind a control socket (unmounting cleanly).
    Down(SocketArgs),
    /// Mount the file system of a running server's blobstore on a directory.
    Mount(MountArgs),
    /// Unmount a running server's file system.
    Umount(UmountArgs),
    /// Call a JSON-RPC method of a running server (`claudefs rpc METHOD --help` describes one).
    Rpc(RpcArgs),
    /// Benchmark or verify bdevs (like SPDK's bdevperf).
    Bdevperf(bdevperf::Args),
    /// Benchmark fabric RPC round trips against an echo listener.
    Fabricperf(fabricperf::Args),
    /// Benchmark blobstore metadata: operations per second, load and recovery time.
    Blobperf(blobperf::Args),
    /// Benchmark the data-reduction stages alone against the whole pipeline.
    Reduceperf(reduceperf::Args),
}

#[derive(clap::Args)]
struct SocketArgs {
    /// Control socket of the server.
    #[arg(short = 's', long = "server", default_value = pmd::rpc::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
struct MountArgs {
    #[command(flatten)]
    server: SocketArgs,
    /// The bdev whose loaded blobstore holds the file system.
    #[arg(long, default_value = "Uring0")]
    bdev: String,
    /// An existing, empty directory.
    mountpoint: PathBuf,
    /// Write through the kernel's writeback cache (docs/fs.md).
    #[arg(long)]
    writeback_cache: bool,
    /// Serve FUSE requests over /dev/fuse only (docs/fs.md, "Transports").
    #[arg(long)]
    dev_fuse_only: bool,
}

#[derive(clap::Args)]
struct UmountArgs {
    #[command(flatten)]
    server: SocketArgs,
    /// The mount point.
    mountpoint: PathBuf,
}

/// Calls one method and prints its result.
fn call(socket: &std::path::Path, method: &str, params: Option<serde_json::Value>) -> anyhow::Result<ExitCode> {
    let mut client = clients::control::Client::connect(socket, Duration::from_secs(120))?;
    let result = client.call(method, params)?;
    emit(&format!("{}\n", serde_json::to_string_pretty(&result)?))?;
    Ok(ExitCode::SUCCESS)
}

/// Writes a command's output to stdout. A reader that closed the pipe early
/// (`claudefs rpc ... | grep -q X`) has what it wanted: that is the normal end,
/// not an error (Rust ignores SIGPIPE, so `println!` would panic instead).
fn emit(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[derive(clap::Args)]
#[command(disable_help_flag = true)]
struct RpcArgs {
    /// Control socket of the server.
    #[arg(short = 's', long = "server", default_value = pmd::rpc::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Seconds to wait for the response.
    #[arg(short = 't', long, default_value_t = 60.0)]
    timeout: f64,
    /// Print the result as compact JSON on one line.
    #[arg(long)]
    raw: bool,
    /// The method (rpc_get_methods lists them).
    #[arg(allow_hyphen_values = true)]
    method: String,
    /// Parameters: `--name value` pairs, one JSON object, or --help for the method's help.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    params: Vec<String>,
}

fn rpc(args: RpcArgs) -> anyhow::Result<ExitCode> {
    use clients::control::{Client, ClientError, params_from_args, render_help};
    if args.method == "--help" || args.method == "-h" {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        if let Some(rpc) = cmd.find_subcommand_mut("rpc") {
            rpc.print_help()?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    let mut client = Client::connect(&args.socket, timeout)?;
    if args.params.iter().any(|p| p == "--help" || p == "-h") {
        emit(&render_help(&client.describe(&args.method)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let params = if args.params.is_empty() || args.params[0].trim_start().starts_with('{') {
        params_from_args(&args.method, &serde_json::Value::Null, &args.params)?
    } else {
        let detail = client.describe(&args.method)?;
        params_from_args(&args.method, &detail["params"], &args.params)?
    };
    match client.call(&args.method, params) {
        Ok(result) => {
            let text = if args.raw { serde_json::to_string(&result)? } else { serde_json::to_string_pretty(&result)? };
            emit(&format!("{text}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ ClientError::Rpc { .. }) => {
            eprintln!("claudefs rpc {}: {e}", args.method);
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

/// Logging without RUST_LOG: openraft's routine chatter left out, and
/// fuser's unmount warnings, since the server unmounts itself first and
/// fuser's second try then fails harmlessly (`methods::fs::unmount`).
const DEFAULT_LOG: &str = "info,openraft=warn";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(a) => server::run(a).map(|()| ExitCode::SUCCESS),
        Command::Up(a) => up::up(a),
        Command::Down(a) => call(&a.socket, "framework_shutdown", None),
        Command::Mount(a) => std::path::absolute(&a.mountpoint).map_err(Into::into).and_then(|path| {
            let params = serde_json::json!({
                "bdev_name": a.bdev, "mountpoint": path, "writeback_cache": a.writeback_cache,
                "dev_fuse_only": a.dev_fuse_only
            });
            call(&a.server.socket, "fs_mount", Some(params))
        }),
        Command::Umount(a) => std::path::absolute(&a.mountpoint)
            .map_err(Into::into)
            .and_then(|path| call(&a.server.socket, "fs_umount", Some(serde_json::json!({ "mountpoint": path })))),
        Command::Rpc(a) => rpc(a),
        Command::Bdevperf(a) => bdevperf::run(a),
        Command::Fabricperf(a) => fabricperf::run(a),
        Command::Blobperf(a) => blobperf::run(a),
        Command::Reduceperf(a) => reduceperf::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("claudefs: {e:#}");
            ExitCode::from(1)
        }
    }
}
