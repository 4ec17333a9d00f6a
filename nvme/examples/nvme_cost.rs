//! The NVMe driver's CPU cost per I/O, without the device's: run under
//! callgrind by `hack/bench/nvme.py`.
//!
//!   nvme_cost driver N    N 4 KiB reads at queue depth 32 through an I/O
//!                         queue pair on the test twin's emulated controller
//!   nvme_cost null N      the same loop through a bdev channel on a null bdev
//!                         (the bdev layer's own cost: the reference)
//!
//! The emulated controller runs only in `Emu::step`, called by this loop
//! between the driver's calls, so callgrind's `--toggle-collect` on the
//! `measured_*` functions (never inlined, each one call into the driver)
//! counts the driver alone: building commands and PRPs, writing the
//! submission queue, the doorbells (one store each, as on hardware), reaping
//! the completion queue by phase tag and handing the request back.

use std::hint::black_box;

use nvme::nvme::{IoQpair, NvmeAttachConfig, attach_twin, controller};
use nvme::vfio::twin::{TwinKernel, TwinSpec};
use nvme::{BdevRegistry, Completion, Io, null};
use pmd::{DmaBuf, Reactor};

const DEPTH: usize = 32;

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "driver".into());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let done = match mode.as_str() {
        "driver" => driver(n),
        "null" => null_bdev(n),
        other => panic!("unknown mode {other:?}: driver or null"),
    };
    println!("{mode}: {done} I/Os");
}

/// Keeps `DEPTH` random 4 KiB reads in flight until `n` completed:
/// `submit(now, io)` takes one, `round(now, out)` runs one polling round and
/// appends what completed.
fn run(n: usize, mut submit: impl FnMut(u64, Io), mut round: impl FnMut(u64, &mut Vec<Completion>)) -> usize {
    let mut free: Vec<DmaBuf> = (0..DEPTH).map(|_| DmaBuf::new(4096).unwrap()).collect();
    let mut out = Vec::with_capacity(DEPTH);
    let mut rng = fastrand::Rng::with_seed(1);
    let (mut submitted, mut completed, mut now) = (0, 0, 0u64);
    while completed < n {
        while submitted < n
            && let Some(buf) = free.pop()
        {
            submit(now, Io::read(rng.u64(0..16384), buf, submitted as u64));
            submitted += 1;
        }
        now += 1000;
        round(now, &mut out);
        for c in out.drain(..) {
            assert!(c.status.is_ok());
            free.push(c.bufs.into_one().unwrap());
            completed += 1;
        }
    }
    black_box(completed)
}

fn driver(n: usize) -> usize {
    let kernel = TwinKernel::new(vec![TwinSpec::nvme("0000:00:05.0", 5)]);
    let registry = BdevRegistry::new();
    attach_twin(&registry, &NvmeAttachConfig::pcie("Nvme0", "0000:00:05.0"), &kernel).unwrap();
    let ctrl = controller("Nvme0").unwrap();
    let qp = std::cell::RefCell::new(IoQpair::open(&ctrl).unwrap());
    let emu = kernel.emu("0000:00:05.0").unwrap();
    kernel.set_manual(true);
    run(
        n,
        |now, io| measured_submit(&mut qp.borrow_mut(), now, io),
        |now, out| {
            let mut qp = qp.borrow_mut();
            measured_poll(&mut qp, now); // rings the SQ doorbell
            emu.lock().unwrap().step(); // the device: not the driver's cost
            measured_poll(&mut qp, now); // reaps the CQ
            measured_completions(&mut qp, out);
        },
    )
}

fn null_bdev(n: usize) -> usize {
    let registry = BdevRegistry::new();
    let config = null::NullConfig { name: "Null0".into(), num_blocks: 16384, block_size: 4096, uuid: None };
    null::create(&registry, &config).unwrap();
    let desc = registry.open("Null0", false).unwrap();
    let mut reactor = Reactor::group(1).pop().unwrap();
    let ch = std::cell::RefCell::new(reactor.with_ctx(|ctx| desc.channel(ctx)).unwrap());
    run(
        n,
        |now, io| measured_null_submit(&mut ch.borrow_mut(), now, io),
        |now, out| measured_null_poll(&mut ch.borrow_mut(), now, out),
    )
}

#[inline(never)]
fn measured_submit(qp: &mut IoQpair, now: u64, io: Io) {
    qp.submit_raw(now, 1, io).unwrap();
}

#[inline(never)]
fn measured_poll(qp: &mut IoQpair, now: u64) {
    qp.poll(now);
}

#[inline(never)]
fn measured_completions(qp: &mut IoQpair, out: &mut Vec<Completion>) {
    qp.completions(out);
}

#[inline(never)]
fn measured_null_submit(ch: &mut nvme::BdevChannel, now: u64, io: Io) {
    ch.submit(now, io);
}

#[inline(never)]
fn measured_null_poll(ch: &mut nvme::BdevChannel, now: u64, out: &mut Vec<Completion>) {
    ch.poll(now, out);
}
