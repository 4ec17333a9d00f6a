//! A harness that drives one reactor and bdev channels synchronously, and
//! the NVMe driver scenarios shared by the twin and the VFIO tests.
#![allow(dead_code)]

pub mod scenarios;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme::{BdevChannel, BdevRegistry, Completion, Io, IoError};
use pmd::{DmaBuf, Reactor};

pub struct Harness {
    pub reactor: Reactor,
    pub registry: Arc<BdevRegistry>,
    /// Simulated time in ns, advanced by every poll.
    pub now: u64,
}

impl Harness {
    pub fn new() -> Self {
        Self { reactor: Reactor::group(1).pop().unwrap(), registry: BdevRegistry::new(), now: 0 }
    }

    pub fn channel(&mut self, name: &str, writable: bool) -> BdevChannel {
        let desc = self.registry.open(name, writable).unwrap();
        self.reactor.with_ctx(|ctx| desc.channel(ctx)).unwrap()
    }

    /// Polls until `n` completions arrived (10 s of real time at most).
    pub fn wait(&mut self, ch: &mut BdevChannel, n: usize) -> Vec<Completion> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            self.now += 1_000;
            self.reactor.poll(self.now, 16);
            ch.poll(self.now, &mut out);
            assert!(Instant::now() < deadline, "only {} of {n} completions within 10 s", out.len());
        }
        out
    }

    /// Polls until the channel has nothing outstanding; returns what completed.
    pub fn settle(&mut self, ch: &mut BdevChannel) -> Vec<Completion> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            self.now += 1_000;
            self.reactor.poll(self.now, 16);
            ch.poll(self.now, &mut out);
            if ch.outstanding() == 0 {
                return out;
            }
            assert!(Instant::now() < deadline, "{} requests still outstanding after 10 s", ch.outstanding());
        }
    }

    pub fn run(&mut self, ch: &mut BdevChannel, io: Io) -> Completion {
        ch.submit(self.now, io);
        let mut c = self.wait(ch, 1);
        assert_eq!(c.len(), 1);
        c.pop().unwrap()
    }

    pub fn write(&mut self, ch: &mut BdevChannel, block: u64, data: &[u8]) -> Result<(), IoError> {
        self.run(ch, Io::write(block, DmaBuf::copy_from(data).unwrap(), 0)).status
    }

    pub fn read(&mut self, ch: &mut BdevChannel, block: u64, len: usize) -> Result<Vec<u8>, IoError> {
        let c = self.run(ch, Io::read(block, DmaBuf::new(len).unwrap(), 0));
        c.status.map(|()| c.bufs.into_one().unwrap().to_vec())
    }

    pub fn flush(&mut self, ch: &mut BdevChannel) -> Result<(), IoError> {
        self.run(ch, Io::flush(0)).status
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}
