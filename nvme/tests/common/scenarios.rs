//! Scenarios of the NVMe driver, run against the test twin's emulated
//! controllers (`nvme_twin.rs`) and against QEMU's controllers behind VFIO
//! in the guest of `hack/vm-test.sh` (`vfio.rs`).
//!
//! A rig has two controllers: `dual`, with a namespace of 512-byte blocks
//! (nsid 1) and one of 4 KiB blocks (nsid 2), and `small`, whose MDTS is
//! 16 KiB, so larger transfers must be split.
#![allow(dead_code)]

use std::sync::Arc;

use nvme::nvme::{IoQpair, NvmeAttachConfig, controller, detach};
use nvme::{BdevChannel, BdevError, BdevRegistry, Completion, Io, IoError};
use pmd::{DmaBuf, Reactor};

use super::{Harness, pattern};

/// What a controller was configured as (and must identify as).
#[derive(Clone)]
pub struct CtrlSpec {
    pub name: &'static str,
    pub traddr: String,
    pub serial: &'static str,
    /// Expected model prefix.
    pub model: &'static str,
    /// (block size, blocks) per namespace, nsid 1 first.
    pub namespaces: Vec<(u32, u64)>,
    pub mdts_bytes: usize,
}

pub type AttachFn = Box<dyn Fn(&Arc<BdevRegistry>, &NvmeAttachConfig) -> Result<Vec<String>, BdevError>>;

pub struct Rig {
    pub h: Harness,
    pub dual: CtrlSpec,
    pub small: CtrlSpec,
    pub attach: AttachFn,
}

impl Rig {
    pub fn config(spec: &CtrlSpec) -> NvmeAttachConfig {
        NvmeAttachConfig::pcie(spec.name, &spec.traddr)
    }

    pub fn attach_both(&mut self) {
        for spec in [self.dual.clone(), self.small.clone()] {
            let names = (self.attach)(&self.h.registry, &Self::config(&spec)).unwrap();
            let want: Vec<String> = (1..=spec.namespaces.len()).map(|i| format!("{}n{i}", spec.name)).collect();
            assert_eq!(names, want);
        }
    }

    pub fn detach_both(&mut self) {
        for spec in [&self.dual, &self.small] {
            detach(&self.h.registry, spec.name).unwrap();
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Leave nothing attached for the next test of the process (the guest runs them one by one).
        for spec in [&self.dual, &self.small] {
            let _ = detach(&self.h.registry, spec.name);
        }
    }
}

pub fn identify_matches_the_configuration(rig: &mut Rig) {
    rig.attach_both();
    for spec in [&rig.dual, &rig.small] {
        let c = controller(spec.name).unwrap();
        assert_eq!(c.data().serial, spec.serial);
        assert!(c.data().model.starts_with(spec.model), "model {:?}", c.data().model);
        assert_eq!(c.max_transfer(), spec.mdts_bytes.min(2 << 20));
        assert!(c.version().starts_with("1."), "NVMe version {}", c.version());
        let got: Vec<(u32, u64)> = c.namespaces().iter().map(|n| (n.data.block_size, n.data.nsze)).collect();
        assert_eq!(got, spec.namespaces);
        for (i, &(bs, blocks)) in spec.namespaces.iter().enumerate() {
            let b = rig.h.registry.get(&format!("{}n{}", spec.name, i + 1)).unwrap();
            assert_eq!((b.block_size(), b.num_blocks(), b.product_name()), (bs, blocks, "NVMe disk"));
        }
        let health = c.health().unwrap();
        assert!(health.temperature_kelvin > 200, "SMART temperature {}", health.temperature_kelvin);
        c.error_log().unwrap();
    }
}

fn round_trip(h: &mut Harness, ch: &mut BdevChannel, block: u64, data: &[u8]) {
    h.write(ch, block, data).unwrap_or_else(|e| panic!("write of {} bytes at {block}: {e}", data.len()));
    let back = h.read(ch, block, data.len()).unwrap();
    assert!(back == data, "{} bytes at block {block} read back differently", data.len());
}

/// Random data from one block to several MiB at random offsets, in one
/// buffer and scattered over several.
pub fn random_data_round_trips(rig: &mut Rig, big: usize) {
    rig.attach_both();
    let mut rng = fastrand::Rng::with_seed(11);
    for bdev in [format!("{}n1", rig.dual.name), format!("{}n2", rig.dual.name), format!("{}n1", rig.small.name)] {
        let mut ch = rig.h.channel(&bdev, true);
        let b = rig.h.registry.get(&bdev).unwrap();
        let bs = b.block_size() as usize;
        let blocks = b.num_blocks();
        for (i, len) in [bs, 2 * bs, 3 * bs, 8 * bs, 64 * 1024, 100 * bs, 1 << 20, big].into_iter().enumerate() {
            let offset = rng.u64(0..blocks - (len / bs) as u64);
            round_trip(&mut rig.h, &mut ch, offset, &pattern(i as u64 + offset, len));
        }
        // Scattered: page-aligned pieces (PRP lists), then pieces of single blocks (SGL, or
        // a command per piece where the controller has no SGLs).
        for pieces in [vec![4096usize, 8192, 3 * 4096], vec![bs, 2 * bs, bs, 4 * bs]] {
            let total: usize = pieces.iter().sum();
            let data = pattern(total as u64, total);
            let mut at = 0;
            let bufs: Vec<DmaBuf> = pieces
                .iter()
                .map(|&n| {
                    at += n;
                    DmaBuf::copy_from(&data[at - n..at]).unwrap()
                })
                .collect();
            let offset = rng.u64(0..blocks - (total / bs) as u64);
            assert_eq!(
                rig.h.run(&mut ch, Io::write(offset, bufs, 0)).status,
                Ok(()),
                "{bdev}: scattered write {pieces:?}"
            );
            let bufs: Vec<DmaBuf> = pieces.iter().rev().map(|&n| DmaBuf::new(n).unwrap()).collect();
            let c = rig.h.run(&mut ch, Io::read(offset, bufs, 0));
            assert_eq!(c.status, Ok(()));
            let mut back = vec![0; total];
            c.bufs.copy_out(0, &mut back);
            assert!(back == data, "{bdev}: scattered read of {pieces:?}");
        }
        // Many requests in flight at once, more than the queue has entries.
        let n = 300u64;
        for i in 0..n {
            ch.submit(rig.h.now, Io::write(i * 2, DmaBuf::copy_from(&pattern(i, bs)).unwrap(), i));
        }
        let done = rig.h.wait(&mut ch, n as usize);
        assert!(done.iter().all(|c| c.status.is_ok()));
        assert_eq!(rig.h.read(&mut ch, 2 * 123, bs).unwrap(), pattern(123, bs));
    }
}

/// Both reactors drive their own queue pair on the same controller at once.
pub fn two_reactors_use_their_own_queue_pairs(rig: &mut Rig) {
    rig.attach_both();
    let name = format!("{}n2", rig.dual.name);
    let desc = rig.h.registry.open(&name, true).unwrap();
    let mut reactors = Reactor::group(2);
    let mut chans: Vec<BdevChannel> =
        reactors.iter_mut().map(|r| r.with_ctx(|ctx| desc.channel(ctx)).unwrap()).collect();
    let ctrl = controller(rig.dual.name).unwrap();
    assert_eq!(ctrl.io_queues_in_use(), 2, "one queue pair per reactor");
    let per = 64u64;
    for (r, ch) in chans.iter_mut().enumerate() {
        for i in 0..per {
            let block = r as u64 * 1000 + i * 4;
            ch.submit(0, Io::write(block, DmaBuf::copy_from(&pattern(block, 4 * 4096)).unwrap(), i));
        }
    }
    let mut done = [Vec::new(), Vec::new()];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut now = 0;
    while done.iter().any(|d| d.len() < per as usize) {
        now += 1000;
        for (r, reactor) in reactors.iter_mut().enumerate() {
            reactor.poll(now, 16);
            chans[r].poll(now, &mut done[r]);
        }
        assert!(std::time::Instant::now() < deadline, "completions: {} and {}", done[0].len(), done[1].len());
    }
    assert!(done.iter().flatten().all(|c| c.status.is_ok()));
    drop(chans);
    drop(reactors);
    assert_eq!(ctrl.io_queues_in_use(), 0, "queue pairs are deleted with their last channel");
    let mut ch = rig.h.channel(&name, false);
    for r in 0..2u64 {
        let block = r * 1000 + 17 * 4;
        assert_eq!(rig.h.read(&mut ch, block, 4 * 4096).unwrap(), pattern(block, 4 * 4096));
    }
}

/// Flush, write zeroes and deallocate do what they say; an LBA beyond the
/// namespace is refused by the bdev layer and, sent raw, by the controller.
pub fn flush_zeroes_deallocate_and_range_errors(rig: &mut Rig) {
    rig.attach_both();
    let name = format!("{}n1", rig.dual.name);
    let mut ch = rig.h.channel(&name, true);
    let bs = 512;
    let data = pattern(5, 64 * bs);
    round_trip(&mut rig.h, &mut ch, 100, &data);
    assert_eq!(rig.h.flush(&mut ch), Ok(()));
    assert_eq!(rig.h.run(&mut ch, Io::write(100, DmaBuf::copy_from(&data).unwrap(), 0).with_fua(true)).status, Ok(()));
    assert_eq!(rig.h.run(&mut ch, Io::write_zeroes(110, 10, 0)).status, Ok(()));
    let mut want = data.clone();
    want[10 * bs..20 * bs].fill(0);
    assert!(rig.h.read(&mut ch, 100, 64 * bs).unwrap() == want, "write zeroes zeroed blocks 110 to 119 only");
    assert_eq!(rig.h.run(&mut ch, Io::unmap(130, 16, 0)).status, Ok(()));
    let ctrl = controller(rig.dual.name).unwrap();
    if ctrl.namespaces()[0].data.deallocate_zeroes {
        want[30 * bs..46 * bs].fill(0);
    }
    let back = rig.h.read(&mut ch, 100, 64 * bs).unwrap();
    let first_difference = |a: &[u8], b: &[u8]| a.iter().zip(b).position(|(x, y)| x != y);
    assert_eq!(first_difference(&back[..30 * bs], &want[..30 * bs]), None, "blocks before the deallocated ones");
    assert_eq!(first_difference(&back[46 * bs..], &want[46 * bs..]), None, "blocks after the deallocated ones");
    if ctrl.namespaces()[0].data.deallocate_zeroes {
        assert_eq!(first_difference(&back, &want), None, "deallocated blocks read as zeros (DLFEAT)");
    }
    let blocks = rig.h.registry.get(&name).unwrap().num_blocks();
    let c = rig.h.run(&mut ch, Io::read(blocks - 1, DmaBuf::new(2 * bs).unwrap(), 0));
    assert_eq!(c.status, Err(IoError::OutOfRange));
    // The same request sent raw reaches the controller, whose error is surfaced.
    let mut qp = IoQpair::open(&ctrl).unwrap();
    qp.submit_raw(0, 1, Io::read(blocks - 1, DmaBuf::new(2 * bs).unwrap(), 7)).unwrap();
    let c = poll_raw(&mut qp, 1).pop().unwrap();
    assert_eq!((c.tag, c.status), (7, Err(IoError::OutOfRange)));
    assert!(c.bufs.into_one().is_some(), "the buffer comes back with the error");
}

pub fn poll_raw(qp: &mut IoQpair, n: usize) -> Vec<Completion> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut out = Vec::new();
    let mut now = 0;
    while out.len() < n {
        now += 1000;
        qp.poll(now);
        qp.completions(&mut out);
        assert!(std::time::Instant::now() < deadline, "{} of {n} raw completions", out.len());
    }
    out
}

/// A reset while requests are in flight: every request completes exactly
/// once (done or aborted) and the controller serves I/O again afterwards.
pub fn reset_during_io_recovers(rig: &mut Rig) {
    rig.attach_both();
    let name = format!("{}n2", rig.dual.name);
    let mut ch = rig.h.channel(&name, true);
    let ctrl = controller(rig.dual.name).unwrap();
    let n = 200u64;
    for i in 0..n {
        ch.submit(rig.h.now, Io::write(i, DmaBuf::copy_from(&pattern(i, 4096)).unwrap(), i));
    }
    let resets = ctrl.resets();
    let resetter = {
        let ctrl = ctrl.clone();
        std::thread::spawn(move || ctrl.reset())
    };
    let done = rig.h.wait(&mut ch, n as usize);
    resetter.join().unwrap().unwrap();
    assert_eq!(ctrl.resets(), resets + 1);
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..n).collect::<Vec<_>>(), "every request completes exactly once");
    assert!(
        done.iter().all(|c| matches!(c.status, Ok(()) | Err(IoError::Aborted))),
        "{:?}",
        done.iter().map(|c| c.status).collect::<Vec<_>>()
    );
    for i in [0u64, 77, 199] {
        round_trip(&mut rig.h, &mut ch, i, &pattern(i + 1000, 4096));
    }
}

/// Detach shuts the controller down and removes its bdevs; attaching again
/// finds the data written before.
pub fn detach_and_reattach(rig: &mut Rig) {
    rig.attach_both();
    let name = format!("{}n1", rig.small.name);
    let data = pattern(42, 64 * 1024);
    {
        let mut ch = rig.h.channel(&name, true);
        round_trip(&mut rig.h, &mut ch, 8, &data);
        let err = detach(&rig.h.registry, rig.small.name).unwrap_err();
        assert!(err.to_string().contains("open"), "detach while open: {err}");
    }
    let again = (rig.attach)(&rig.h.registry, &Rig::config(&rig.small)).unwrap_err();
    assert!(again.to_string().contains("already attached"), "{again}");
    detach(&rig.h.registry, rig.small.name).unwrap();
    assert!(rig.h.registry.get(&name).is_err());
    assert!(controller(rig.small.name).is_err());
    (rig.attach)(&rig.h.registry, &Rig::config(&rig.small)).unwrap();
    let mut ch = rig.h.channel(&name, false);
    assert_eq!(rig.h.read(&mut ch, 8, data.len()).unwrap(), data);
}
