//! `claudefs blobperf`: blobstore metadata benchmarks.
//!
//! - `md`: metadata operations per second — create, resize+sync, snapshot,
//!   clone — with `--depth` operations in flight, against the bdev's raw
//!   4 KiB FUA writes per second at depth 1 (every durable metadata change
//!   needs at least one; group commit lets several share one).
//! - `load`: the time to load a store holding `--blobs` blobs after a clean
//!   unload, and to recover it after a crash with a journal filled to just
//!   under its checkpoint threshold.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blobfs::{BlobOptions, Blobstore, FormatOptions};
use nvme::Io;
use pmd::dma::HugepageMode;
use pmd::{DmaBuf, IdlePolicy};
use serde_json::json;

use crate::app::{App, read_config, replay};

/// Options of `claudefs blobperf`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Config creating the bdev (a JSON list of method calls).
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// The bdev to format.
    #[arg(short = 'b', long = "bdev")]
    bdev: String,
    /// Cluster size (suffixes k, m).
    #[arg(long, default_value = "1m", value_parser = crate::bdevperf::parse_size)]
    cluster_size: u64,
    /// Journal pages (default: the blobstore's).
    #[arg(long)]
    journal_pages: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Metadata operations per second.
    Md {
        /// Operations of each kind.
        #[arg(long, default_value_t = 2000)]
        ops: u64,
        /// Operations in flight.
        #[arg(long, default_value_t = 1)]
        depth: u64,
    },
    /// Clean load and dirty recovery time.
    Load {
        /// Blobs in the store.
        #[arg(long, default_value_t = 100_000)]
        blobs: u64,
    },
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let calls = read_config(&args.config)?;
    let (runtime, mask) = crate::server::start_runtime("0x1", IdlePolicy::Adaptive, 50, HugepageMode::Auto, None)?;
    let app = App::new(runtime.reactors().clone(), mask, IdlePolicy::Adaptive);
    let methods = crate::methods::build(&app);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(replay(&app, &methods, calls, false))
        .with_context(|| format!("loading config {}", args.config.display()))?;
    let cluster_size = u32::try_from(args.cluster_size).context("cluster size")?;
    let opts = FormatOptions { cluster_size, journal_pages: args.journal_pages };
    let report = match args.mode {
        Mode::Md { ops, depth } => rt.block_on(md(&app, &args.bdev, opts, ops, depth.max(1)))?,
        Mode::Load { blobs } => rt.block_on(load(&app, &args.bdev, opts, blobs))?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report:#}");
    }
    drop(runtime);
    Ok(ExitCode::SUCCESS)
}

/// Raw 4 KiB FUA writes per second at depth 1, on reactor 0.
async fn raw_fua_rate(app: &App, bdev: &str, ops: u64) -> anyhow::Result<f64> {
    let desc = app.registry.open(bdev, true)?;
    let blocks = 4096 / desc.bdev().block_size() as u64;
    let span = desc.bdev().num_blocks() / blocks;
    let rx = app.reactors[0].spawn(move |ctx| {
        let ch = desc.channel(ctx);
        async move {
            let mut ch = ch?;
            let mut buf = Some(DmaBuf::zeroed(4096)?);
            let mut rng = fastrand::Rng::with_seed(7);
            let start = Instant::now();
            for _ in 0..ops {
                let io = Io::write(rng.u64(0..span) * blocks, buf.take().expect("returned"), 0).with_fua(true);
                let c = ch.run_one(io).await;
                c.status.map_err(|e| anyhow::anyhow!("FUA write failed: {e}"))?;
                buf = c.bufs.into_one();
            }
            anyhow::Ok(ops as f64 / start.elapsed().as_secs_f64())
        }
    });
    rx.await.context("reactor stopped")?
}

/// Runs `ops` operations made by `op(i)`, `depth` at a time; returns ops/s.
async fn rate<F, Fut>(ops: u64, depth: u64, op: F) -> anyhow::Result<f64>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), blobfs::BlobError>> + Send + 'static,
{
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < ops || !set.is_empty() {
        while next < ops && (set.len() as u64) < depth {
            set.spawn(op(next));
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            r.context("an operation panicked")??;
        }
    }
    Ok(ops as f64 / start.elapsed().as_secs_f64())
}

async fn md(app: &App, bdev: &str, opts: FormatOptions, ops: u64, depth: u64) -> anyhow::Result<serde_json::Value> {
    let reference = raw_fua_rate(app, bdev, ops.min(2000)).await?;
    let store = Blobstore::format(&app.registry, bdev, app.reactors[0].clone(), opts).await?;
    let before = store.stats().await?.ops;
    let s = store.clone();
    let create = rate(ops, depth, move |i| {
        let s = s.clone();
        async move {
            let xattrs = [("name".to_string(), format!("blob{i}"))].into();
            s.create_blob(BlobOptions { num_clusters: 1, thin: true, xattrs, ..Default::default() }).await.map(|_| ())
        }
    })
    .await?;
    let mut blobs = Vec::new();
    for _ in 0..depth {
        blobs.push(store.create_blob(BlobOptions { num_clusters: 1, thin: true, ..Default::default() }).await?);
    }
    let (s, b) = (store.clone(), blobs.clone());
    let resize = rate(ops, depth, move |i| {
        let n = b.len() as u64;
        let (s, id) = (s.clone(), b[(i % n) as usize]);
        async move {
            s.resize_blob(id, 1 + (i / n) % 2 + 1).await?;
            s.sync_blob(id).await
        }
    })
    .await?;
    let (s, b) = (store.clone(), blobs.clone());
    let snapshot = rate(ops, depth, move |i| {
        let (s, id) = (s.clone(), b[(i % b.len() as u64) as usize]);
        async move { s.snapshot(id, Default::default()).await.map(|_| ()) }
    })
    .await?;
    let snap = store.snapshot(blobs[0], Default::default()).await?;
    let s = store.clone();
    let clone = rate(ops, depth, move |_| {
        let s = s.clone();
        async move { s.clone_blob(snap, Default::default()).await.map(|_| ()) }
    })
    .await?;
    let after = store.stats().await?.ops;
    store.unload().await?;
    let per = |r: f64| json!({ "ops_per_s": r, "ratio_to_raw_fua_writes": r / reference });
    Ok(json!({
        "bdev": bdev, "depth": depth, "ops_each": ops,
        "raw_fua_4k_writes_per_s": reference,
        "create": per(create), "resize_sync": per(resize), "snapshot": per(snapshot), "clone": per(clone),
        "journal_writes": after.journal_writes - before.journal_writes,
        "checkpoints": after.checkpoints - before.checkpoints,
    }))
}

async fn load(app: &App, bdev: &str, opts: FormatOptions, blobs: u64) -> anyhow::Result<serde_json::Value> {
    let size = app.registry.get(bdev)?.size_bytes();
    let store = Blobstore::format(&app.registry, bdev, app.reactors[0].clone(), opts).await?;
    let s = store.clone();
    let fill = Instant::now();
    rate(blobs, 128, move |i| {
        let s = s.clone();
        async move {
            // One blob in ten is thick (a cluster of its own), the rest thin.
            let xattrs = [("name".to_string(), format!("blob{i}"))].into();
            s.create_blob(BlobOptions { num_clusters: 4, thin: i % 10 != 0, xattrs, ..Default::default() })
                .await
                .map(|_| ())
        }
    })
    .await?;
    let fill_s = fill.elapsed().as_secs_f64();
    store.unload().await?;

    let home = app.reactors[0].clone();
    let t = Instant::now();
    let (store, clean_report) = Blobstore::load(&app.registry, bdev, home.clone()).await?;
    let clean_s = t.elapsed().as_secs_f64();
    if !clean_report.clean || clean_report.blobs != blobs {
        bail!("the clean load found {} blobs (clean: {})", clean_report.blobs, clean_report.clean);
    }
    // Fill the journal to just under the checkpoint threshold, then crash.
    let stats = store.stats().await?;
    let target = stats.journal_pages * 2 / 5;
    let mut i = 0u64;
    while store.stats().await?.journal_used_pages < target {
        let s = store.clone();
        rate(256, 64, move |k| {
            let s = s.clone();
            async move {
                let id = 1 + (i * 256 + k) % blobs;
                s.set_xattr(id, "touched", &k.to_le_bytes()).await?;
                s.sync_blob(id).await
            }
        })
        .await?;
        i += 1;
    }
    let journal_used = store.stats().await?.journal_used_pages;
    store.abandon().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let (store, dirty_report) = Blobstore::load(&app.registry, bdev, home).await?;
    let dirty_s = t.elapsed().as_secs_f64();
    store.unload().await?;
    Ok(json!({
        "bdev": bdev, "bdev_bytes": size, "blobs": blobs, "fill_s": fill_s,
        "clean_load_s": clean_s, "clean": clean_report,
        "dirty_journal_pages": journal_used, "journal_pages": stats.journal_pages,
        "dirty_load_s": dirty_s, "dirty": dirty_report,
    }))
}
