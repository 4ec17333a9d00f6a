//! `claudefs bdevperf`: drive bdevs at a fixed queue depth and report IOPS,
//! bandwidth and latency percentiles per job and in total (SPDK's bdevperf).
//!
//! The bdevs come from a config (the same JSON list `claudefs server -c`
//! takes). Each bdev gets one job on one reactor (round-robin over the core
//! mask), or one job on every reactor with `-C`. `verify` writes a pattern
//! unique to each block and pass, reads it back and compares every byte; a
//! mismatch stops the run and fails it.

mod job;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use nvme::stats::HistogramSnapshot;
use pmd::IdlePolicy;
use pmd::dma::HugepageMode;
use serde_json::json;

use crate::app::{App, read_config, replay};
use job::{Job, JobResult, JobSpec, TargetSpec};

/// What the jobs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential mix of reads and writes (-M: read percentage).
    Rw,
    /// Random mix of reads and writes (-M).
    Randrw,
    /// Write, read back and compare every byte.
    Verify,
    /// Random unmaps.
    Unmap,
    /// Random write-zeroes.
    WriteZeroes,
    /// Flushes.
    Flush,
}

/// Options of `claudefs bdevperf`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Config creating the bdevs (a JSON list of method calls, as save_config writes).
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Requests in flight per job.
    #[arg(short = 'q', long = "queue-depth")]
    depth: usize,
    /// Request size in bytes (suffixes k, m: 4k, 128k, 1m).
    #[arg(short = 'o', long = "io-size", value_parser = parse_size)]
    io_size: u64,
    /// Workload.
    #[arg(short = 'w', long = "workload")]
    workload: Workload,
    /// Seconds to run.
    #[arg(short = 't', long = "time", default_value_t = 10.0)]
    time: f64,
    /// Cores to run on: hex mask (0x3) or list ([0,2-3]).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    mask: String,
    /// Read percentage for rw and randrw.
    #[arg(short = 'M', long = "rwmixread", default_value_t = 50)]
    rwmix: u32,
    /// Run every bdev on every core (default: each bdev on one core, round-robin).
    #[arg(short = 'C', long = "multithread")]
    every_core: bool,
    /// Only these bdevs (default: every bdev no one claims).
    #[arg(short = 'b', long = "bdev")]
    bdevs: Vec<String>,
    /// Per-request timeout in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Reactor idle policy (a benchmark polls without pause).
    #[arg(long, default_value = "always")]
    idle: IdlePolicy,
    /// Under the adaptive policy, microseconds without work before a reactor sleeps.
    #[arg(long, default_value_t = 200)]
    spin_us: u64,
    /// Run on a blob instead of each bdev: format a blobstore on it (cluster
    /// size in bytes, e.g. 1m) and create one thick blob spanning it.
    #[arg(long, value_parser = parse_size)]
    blobstore: Option<u64>,
    /// DMA memory: auto, require or never hugepages.
    #[arg(long, default_value = "auto", value_parser = crate::server::parse_hugepages)]
    hugepages: HugepageMode,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.strip_suffix(['k', 'm', 'g']) {
        Some(n) => (
            n,
            match t.chars().last() {
                Some('k') => 1 << 10,
                Some('m') => 1 << 20,
                _ => 1 << 30,
            },
        ),
        None => (t.as_str(), 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (examples: 4096, 4k, 1m)"))?;
    n.checked_mul(mult).filter(|&v| v > 0).ok_or_else(|| format!("{s:?} is not a positive size"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.depth == 0 {
        bail!("-q must be at least 1");
    }
    if args.time.is_nan() || args.time <= 0.0 {
        bail!("-t must be a positive number of seconds");
    }
    if args.rwmix > 100 {
        bail!("-M is a percentage (0 to 100), not {}", args.rwmix);
    }
    let calls = read_config(&args.config)?;
    let (runtime, mask) = crate::server::start_runtime(&args.mask, args.idle, args.spin_us, args.hugepages, None)?;
    let app = App::new(runtime.reactors().clone(), mask, args.idle);
    let methods = crate::methods::build(&app);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(replay(&app, &methods, calls, false))
        .with_context(|| format!("loading config {}", args.config.display()))?;

    let bdevs: Vec<_> = if args.bdevs.is_empty() {
        app.registry.list().into_iter().filter(|b| b.claimed_by().is_none()).collect()
    } else {
        args.bdevs.iter().map(|n| app.registry.get(n)).collect::<Result<_, _>>()?
    };
    if bdevs.is_empty() {
        bail!("the config creates no bdev to test (or every bdev is claimed)");
    }
    let writes = !matches!(args.workload, Workload::Read | Workload::Randread);
    let reactors = runtime.reactors().clone();
    let mut targets = Vec::new();
    let mut stores = Vec::new();
    for bdev in &bdevs {
        let target = match args.blobstore {
            None => TargetSpec::Bdev(app.registry.open(bdev.name(), writes)?),
            Some(cluster) => {
                let (store, blob) = rt
                    .block_on(blob_target(&app, bdev.name(), cluster))
                    .with_context(|| format!("preparing a blob on {}", bdev.name()))?;
                stores.push(store.clone());
                TargetSpec::Blob {
                    name: format!("{}/blob{}", bdev.name(), blob.id()),
                    blob: blob.shared().clone(),
                    store,
                }
            }
        };
        targets.push(target);
    }
    let mut specs = Vec::new();
    for (n, target) in targets.into_iter().enumerate() {
        let bs = target.block_size();
        let units = match &target {
            TargetSpec::Bdev(d) => d.bdev().num_blocks(),
            TargetSpec::Blob { blob, store, .. } => blob.num_clusters() * store.pages_per_cluster(),
        };
        if args.io_size % bs != 0 {
            bail!("-o {} is not a multiple of the {}-byte block size of {}", args.io_size, bs, target.name());
        }
        let io_blocks = args.io_size / bs;
        let cores: Vec<usize> = if args.every_core { (0..reactors.len()).collect() } else { vec![n % reactors.len()] };
        // With -C, verify splits the target so that jobs never touch each other's blocks.
        let parts = if args.workload == Workload::Verify { cores.len() as u64 } else { 1 };
        let part = units / parts;
        if part / io_blocks < if args.workload == Workload::Verify { args.depth as u64 } else { 1 } {
            bail!(
                "{} ({} blocks per job) is too small for {} requests of {} blocks in flight",
                target.name(),
                part,
                args.depth,
                io_blocks
            );
        }
        for (k, &r) in cores.iter().enumerate() {
            let range = if parts > 1 { (k as u64 * part, part) } else { (0, units) };
            specs.push((
                r,
                JobSpec {
                    target: target.clone(),
                    workload: args.workload,
                    depth: args.depth,
                    io_blocks,
                    range,
                    duration_ns: (args.time * 1e9) as u64,
                    rwmix_read: args.rwmix,
                    seed: args.seed,
                    timeout: args.timeout_ms.map(Duration::from_millis),
                },
            ));
        }
    }

    if !args.json {
        eprintln!(
            "Running {:?} for {} seconds: depth {}, {} bytes, {} job(s) on cores {}",
            args.workload,
            args.time,
            args.depth,
            args.io_size,
            specs.len(),
            app.mask
        );
    }
    let (tx, rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    let jobs = specs.len();
    for (r, spec) in specs {
        let (tx, err_tx) = (tx.clone(), err_tx.clone());
        reactors[r].send(move |ctx| {
            if let Err(e) = Job::start(spec, ctx, tx) {
                let _ = err_tx.send(e.to_string());
            }
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(args.time) + Duration::from_secs(60);
    let mut results = Vec::new();
    while results.len() < jobs {
        if let Ok(e) = err_rx.try_recv() {
            bail!("starting a job failed: {e}");
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => results.push(r),
            Err(mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() > deadline => {
                bail!(
                    "{} of {jobs} jobs did not finish within 60 s of the end of the run (a request never completed?)",
                    jobs - results.len()
                );
            }
            Err(_) => {}
        }
    }
    results.sort_by_key(|r| (r.bdev.clone(), r.reactor));
    for store in stores {
        if let Err(e) = rt.block_on(store.unload()) {
            tracing::warn!("unloading the blobstore on {} failed: {e}", store.bdev_name());
        }
    }
    drop(runtime);
    report(&args, &results)
}

/// Formats a blobstore on `bdev` and creates a thick blob of nearly all its space.
async fn blob_target(app: &App, bdev: &str, cluster_size: u64) -> anyhow::Result<(blobfs::Blobstore, blobfs::Blob)> {
    let cluster_size = u32::try_from(cluster_size)
        .map_err(|_| anyhow::anyhow!("--blobstore {cluster_size} is too large a cluster size"))?;
    let opts = blobfs::FormatOptions { cluster_size, journal_pages: None };
    let store = blobfs::Blobstore::format(&app.registry, bdev, app.reactors[0].clone(), opts).await?;
    // Leave room for checkpoints.
    let free = store.stats().await?.free_clusters;
    let clusters = free.saturating_sub(4 + free / 64).max(1);
    let id =
        store.create_blob(blobfs::BlobOptions { num_clusters: clusters, thin: false, ..Default::default() }).await?;
    let blob = store.open_blob(id).await?;
    Ok((store, blob))
}

struct Row {
    name: String,
    secs: f64,
    ios: u64,
    iops: f64,
    mibs: f64,
    fail_s: f64,
    to_s: f64,
    latency: HistogramSnapshot,
    avg_us: f64,
}

fn row(name: String, r: &[&JobResult]) -> Row {
    let secs = r.iter().map(|j| j.elapsed_ns).max().unwrap_or(1) as f64 / 1e9;
    let ios: u64 = r.iter().map(|j| j.ios).sum();
    let mut latency = HistogramSnapshot::default();
    for j in r {
        latency.merge(&j.latency);
    }
    let sum_ns: u64 = r.iter().map(|j| j.latency_sum_ns).sum();
    let avg_us = if ios > 0 { sum_ns as f64 / ios as f64 / 1000.0 } else { 0.0 };
    Row {
        name,
        secs,
        ios,
        iops: ios as f64 / secs,
        mibs: r.iter().map(|j| j.bytes).sum::<u64>() as f64 / secs / (1 << 20) as f64,
        fail_s: r.iter().map(|j| j.errors).sum::<u64>() as f64 / secs,
        to_s: r.iter().map(|j| j.timeouts).sum::<u64>() as f64 / secs,
        latency,
        avg_us,
    }
}

fn report(args: &Args, results: &[JobResult]) -> anyhow::Result<ExitCode> {
    let mut rows: Vec<Row> = results
        .iter()
        .map(|r| row(format!("{} (core {})", r.bdev, r.core.map_or("-".into(), |c| c.to_string())), &[r]))
        .collect();
    rows.push(row("Total".into(), &results.iter().collect::<Vec<_>>()));
    let us = |ns: u64| ns as f64 / 1000.0;
    if args.json {
        let j: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "elapsed_s": r.secs, "ios": r.ios, "iops": r.iops, "mib_per_s": r.mibs, "fail_per_s": r.fail_s, "timeout_per_s": r.to_s,
                    "avg_us": r.avg_us, "p50_us": us(r.latency.quantile(0.5)), "p99_us": us(r.latency.quantile(0.99)),
                    "p999_us": us(r.latency.quantile(0.999)), "max_us": us(r.latency.max()),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "workload": format!("{:?}", args.workload).to_lowercase(), "queue_depth": args.depth, "io_size": args.io_size,
                "time_s": args.time, "jobs": j,
            }))?
        );
    } else {
        println!(
            "{:<28} {:>12} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "Job", "IOPS", "MiB/s", "Fail/s", "TO/s", "avg(us)", "p50(us)", "p99(us)", "p99.9(us)", "max(us)"
        );
        for (i, r) in rows.iter().enumerate() {
            if i + 1 == rows.len() {
                println!("{}", "-".repeat(118));
            }
            println!(
                "{:<28} {:>12.2} {:>10.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                r.name,
                r.iops,
                r.mibs,
                r.fail_s,
                r.to_s,
                r.avg_us,
                us(r.latency.quantile(0.5)),
                us(r.latency.quantile(0.99)),
                us(r.latency.quantile(0.999)),
                us(r.latency.max())
            );
        }
    }
    let mut failed = false;
    for r in results {
        if let Some(m) = &r.mismatch {
            eprintln!("bdevperf: VERIFY FAILED: {m}");
            failed = true;
        }
        if let Some(e) = &r.first_error {
            eprintln!("bdevperf: {} (core {:?}): {} request(s) failed; first: {e}", r.bdev, r.core, r.errors.max(1));
            failed = true;
        }
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("0").is_err());
    }
}
