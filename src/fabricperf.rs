//! `claudefs fabricperf`: RPC round trips against an echo listener
//! (`claudefs server` with `fabric_listen`, or `fabric-echo`), at a fixed
//! number of calls in flight, for one or more payload sizes: calls per
//! second, bandwidth, and round-trip latency percentiles.
//!
//! Each call sends the payload and gets it back, so bandwidth counts both
//! directions, as `fi_pingpong` does; "one-way" is half the round trip,
//! comparable to `fi_pingpong`'s usec/xfer. Every returned payload is checked
//! against what was sent.

use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use fabric::frame::Payload;
use fabric::reactor::attach;
use fabric::rpc::{ConnId, Event, Rpc, RpcOptions};
use fabric::transport::TransportConfig;
use nvme::stats::{Histogram, HistogramSnapshot};
use pmd::IdlePolicy;
use pmd::dma::HugepageMode;
use serde_json::json;

/// Options of `claudefs fabricperf`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Transport: tcp, or a libfabric provider (tcp;ofi_rxm, shm, verbs;ofi_rxm).
    #[arg(long)]
    transport: String,
    /// The echo listener's address (as fabric_listen reported it).
    #[arg(short = 'a', long = "connect")]
    connect: String,
    /// Local address to bind (default: the connect address's IP for socket providers).
    #[arg(long)]
    bind: Option<String>,
    /// Calls in flight.
    #[arg(short = 'q', long = "queue-depth", default_value_t = 1)]
    depth: usize,
    /// Payload sizes, comma-separated (suffixes k, m: 64,4k,1m).
    #[arg(short = 'o', long = "size", value_delimiter = ',', value_parser = crate::bdevperf::parse_size, default_value = "64")]
    sizes: Vec<u64>,
    /// Seconds to measure each size.
    #[arg(short = 't', long = "time", default_value_t = 5.0)]
    time: f64,
    /// Seconds of warm-up before each measurement.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Send bulk payloads inline (fragments) even where RMA is available.
    #[arg(long)]
    no_rma: bool,
    /// Compare every byte of every answer (by default: its length and its
    /// first and last bytes, so that checking does not dominate the timing).
    #[arg(long)]
    verify: bool,
    /// Core to run on: hex mask (0x1) or list ([0,2-3]); the first core is used.
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    mask: String,
    /// Reactor idle policy (a benchmark polls without pause).
    #[arg(long, default_value = "always")]
    idle: IdlePolicy,
    /// DMA memory: auto, require or never hugepages.
    #[arg(long, default_value = "auto", value_parser = crate::server::parse_hugepages)]
    hugepages: HugepageMode,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The measurement of one size.
struct SizeResult {
    size: usize,
    calls: u64,
    secs: f64,
    latency: HistogramSnapshot,
    sum_ns: u64,
}

enum Phase {
    Warmup,
    Measure,
    Drain,
}

/// The closed loop on the reactor: every completion issues the next call.
struct Perf {
    conn: ConnId,
    sizes: Vec<usize>,
    idx: usize,
    depth: usize,
    warmup_ns: u64,
    time_ns: u64,
    phase: Phase,
    measure_start: u64,
    end: u64,
    outstanding: usize,
    calls: u64,
    sum_ns: u64,
    hist: Histogram,
    verify: bool,
    /// The payload of each seed, for --verify.
    patterns: Vec<Payload>,
    tx: mpsc::Sender<Result<SizeResult, String>>,
}

fn pattern(size: usize, seed: u8) -> Payload {
    Payload::from((0..size).map(|i| byte(i, seed)).collect::<Vec<u8>>())
}

fn byte(i: usize, seed: u8) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(seed)
}

fn last_byte(size: usize, seed: u8) -> Option<u8> {
    size.checked_sub(1).map(|i| byte(i, seed))
}

impl Perf {
    fn start_size(&mut self, rpc: &mut Rpc, now: u64) {
        let size = self.sizes[self.idx];
        self.phase = Phase::Warmup;
        self.measure_start = now + self.warmup_ns;
        self.end = self.measure_start + self.time_ns;
        (self.calls, self.sum_ns, self.hist) = (0, 0, Histogram::default());
        self.patterns =
            if self.verify { (0..self.depth).map(|i| pattern(size, i as u8)).collect() } else { Vec::new() };
        for i in 0..self.depth {
            self.issue(rpc, now, pattern(size, i as u8), i as u8);
        }
    }

    /// Tags carry the submit time (high bits) and the payload's pattern seed (low byte).
    fn issue(&mut self, rpc: &mut Rpc, now: u64, payload: Payload, seed: u8) {
        match rpc.call(now, self.conn, 0, payload, (now << 8) | u64::from(seed)) {
            Ok(_) => self.outstanding += 1,
            Err(e) => {
                let _ = self.tx.send(Err(format!("a call failed to start: {e}")));
            }
        }
    }

    fn on_event(&mut self, rpc: &mut Rpc, now: u64, ev: Event) {
        match ev {
            Event::Connected { .. } if self.outstanding == 0 && self.idx == 0 => self.start_size(rpc, now),
            Event::Completion(c) => {
                self.outstanding -= 1;
                let payload = match c.result {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = self.tx.send(Err(format!("a call failed: {e}")));
                        return;
                    }
                };
                let (submitted, seed) = (c.tag >> 8, c.tag as u8);
                let size = self.sizes[self.idx];
                let sample = |p: &[u8]| (p.first().copied(), p.last().copied());
                let intact = payload.len() == size
                    && match self.patterns.get(usize::from(seed)) {
                        Some(want) => payload[..] == want[..],
                        None => sample(&payload) == ((size > 0).then(|| byte(0, seed)), last_byte(size, seed)),
                    };
                if !intact {
                    let _ =
                        self.tx.send(Err(format!("a {size}-byte echo came back different ({} bytes)", payload.len())));
                    return;
                }
                if matches!(self.phase, Phase::Warmup) && now >= self.measure_start {
                    self.phase = Phase::Measure;
                }
                let counted = matches!(self.phase, Phase::Measure) && submitted >= self.measure_start;
                if now >= self.end {
                    self.phase = Phase::Drain;
                }
                let draining = matches!(self.phase, Phase::Drain);
                if !draining {
                    // The next call first: the bookkeeping below is not part of a round trip.
                    self.issue(rpc, now, payload, seed);
                }
                if counted {
                    let rtt = now.saturating_sub(submitted);
                    self.hist.record(rtt);
                    self.sum_ns += rtt;
                    self.calls += 1;
                }
                if draining && self.outstanding == 0 {
                    let r = SizeResult {
                        size,
                        calls: self.calls,
                        secs: self.time_ns as f64 / 1e9,
                        latency: self.hist.snapshot(),
                        sum_ns: self.sum_ns,
                    };
                    self.idx += 1;
                    if self.idx < self.sizes.len() {
                        self.start_size(rpc, now);
                    } else {
                        // Say goodbye, so that the server drops the connection now rather
                        // than at its keepalive timeout.
                        rpc.close(now, self.conn);
                    }
                    let _ = self.tx.send(Ok(r));
                }
            }
            Event::Disconnected { error, .. } if self.idx < self.sizes.len() => {
                let _ = self.tx.send(Err(format!("the connection failed: {error}")));
            }
            _ => {}
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.depth == 0 || args.sizes.is_empty() {
        bail!("-q must be at least 1 and -o must name a size");
    }
    if args.time.is_nan() || args.time <= 0.0 || args.warmup.is_nan() || args.warmup < 0.0 {
        bail!("-t must be positive and --warmup not negative");
    }
    let (runtime, _mask) = crate::server::start_runtime(&args.mask, args.idle, 200, args.hugepages, None)?;
    let max = *args.sizes.iter().max().expect("checked non-empty");
    let opts = RpcOptions {
        name: format!("fabricperf-{}", std::process::id()),
        max_message: max.max(1 << 20).try_into().context("sizes above 4 GiB")?,
        credits: args.depth.clamp(1, usize::from(fabric::rpc::MAX_CREDITS)) as u16,
        ..Default::default()
    };
    let bind = args.bind.clone().or_else(|| match args.transport.as_str() {
        "tcp" | "shm" => None,
        _ => args.connect.parse::<std::net::SocketAddr>().ok().map(|a| a.ip().to_string()),
    });
    let mut cfg = TransportConfig::new(&args.transport, bind.as_deref());
    cfg.rma = !args.no_rma;
    let transport = if args.transport == "tcp" {
        TransportConfig::new("tcp", None).open(opts.max_message)?
    } else {
        cfg.open(opts.max_message)?
    };
    let mut rpc = Rpc::new(transport, opts)?;
    let conn = rpc.connect(pmd::clock::now(), &args.connect)?;
    let (tx, rx) = mpsc::channel();
    let perf = Perf {
        conn,
        sizes: args.sizes.iter().map(|&s| s as usize).collect(),
        idx: 0,
        depth: args.depth,
        warmup_ns: (args.warmup * 1e9) as u64,
        time_ns: (args.time * 1e9) as u64,
        phase: Phase::Warmup,
        measure_start: 0,
        end: 0,
        outstanding: 0,
        calls: 0,
        sum_ns: 0,
        hist: Histogram::default(),
        verify: args.verify,
        patterns: Vec::new(),
        tx,
    };
    if !args.json {
        eprintln!(
            "fabricperf: {} to {}, {} in flight, {} s per size after {} s of warm-up",
            args.transport, args.connect, args.depth, args.time, args.warmup
        );
    }
    runtime.reactors()[0]
        .call(move |ctx| {
            let perf = Rc::new(RefCell::new(perf));
            attach(ctx, rpc, move |rpc, now, ev| perf.borrow_mut().on_event(rpc, now, ev)).map(|_| ())
        })
        .blocking_recv()
        .context("the reactor stopped")??;
    let per_size = Duration::from_secs_f64(args.warmup + args.time) + Duration::from_secs(30);
    let mut results = Vec::new();
    while results.len() < args.sizes.len() {
        match rx.recv_timeout(per_size) {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("no result within {per_size:?} (is the echo listener at {} running?)", args.connect),
        }
    }
    drop(runtime);
    report(&args, &results);
    Ok(ExitCode::SUCCESS)
}

fn report(args: &Args, results: &[SizeResult]) {
    let us = |ns: u64| ns as f64 / 1000.0;
    let rows: Vec<_> = results
        .iter()
        .map(|r| {
            let rate = r.calls as f64 / r.secs;
            let avg = if r.calls > 0 { r.sum_ns as f64 / r.calls as f64 / 1000.0 } else { 0.0 };
            json!({
                "size": r.size, "queue_depth": args.depth, "calls": r.calls, "calls_per_s": rate,
                "mb_per_s": 2.0 * r.size as f64 * rate / 1e6, "rtt_avg_us": avg, "one_way_us": avg / 2.0,
                "rtt_p50_us": us(r.latency.quantile(0.5)), "rtt_p99_us": us(r.latency.quantile(0.99)),
                "rtt_max_us": us(r.latency.max()),
            })
        })
        .collect();
    if args.json {
        let doc = json!({ "transport": args.transport, "address": args.connect, "results": rows });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    println!(
        "{:>10} {:>6} {:>12} {:>11} {:>10} {:>10} {:>10} {:>10}",
        "size", "depth", "calls/s", "MB/s", "rtt(us)", "1-way(us)", "p50(us)", "p99(us)"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:>10} {:>6} {:>12.0} {:>11.1} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            r["size"],
            args.depth,
            f("calls_per_s"),
            f("mb_per_s"),
            f("rtt_avg_us"),
            f("one_way_us"),
            f("rtt_p50_us"),
            f("rtt_p99_us")
        );
    }
}
