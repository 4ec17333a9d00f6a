//! Drives reactors on the test thread and the store's futures alongside.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use blobfs::{BlobChannel, BlobCompletion, BlobIo, BlobShared, Blobstore, FormatOptions};
use nvme::{BdevRegistry, IoError, crash, malloc};
use pmd::{DmaBuf, Reactor};

pub const PAGE: usize = 4096;

pub struct Harness {
    pub reactors: Vec<Reactor>,
    pub registry: Arc<BdevRegistry>,
    pub now: u64,
}

impl Harness {
    pub fn new(reactors: usize) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        Self { reactors: Reactor::group(reactors), registry: BdevRegistry::new(), now: 0 }
    }

    /// A malloc bdev `M0` of `mib` MiB with 4 KiB blocks, optionally behind crash bdev `C0`.
    pub fn with_malloc(reactors: usize, mib: u64, crash_wrapper: bool) -> (Self, String) {
        let h = Self::new(reactors);
        malloc::create(
            &h.registry,
            &malloc::MallocConfig { name: "M0".into(), num_blocks: mib * 256, block_size: 4096, uuid: None },
        )
        .unwrap();
        if crash_wrapper {
            crash::create(&h.registry, &crash::CrashConfig { name: "C0".into(), base_name: "M0".into(), uuid: None })
                .unwrap();
            (h, "C0".into())
        } else {
            (h, "M0".into())
        }
    }

    pub fn step(&mut self) {
        self.now += 1_000;
        for r in &mut self.reactors {
            r.poll(self.now, 64);
        }
    }

    /// Polls `f` while stepping the reactors until it is ready.
    pub fn run<F: Future>(&mut self, f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..5_000_000 {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            self.step();
        }
        panic!("a future did not complete in 5,000,000 rounds");
    }

    pub fn format(&mut self, bdev: &str, cluster_size: u32, journal_pages: Option<u64>) -> Blobstore {
        let home = self.reactors[0].handle();
        let reg = self.registry.clone();
        let bdev = bdev.to_string();
        self.run(
            async move { Blobstore::format(&reg, &bdev, home, FormatOptions { cluster_size, journal_pages }).await },
        )
        .unwrap()
    }

    pub fn load(&mut self, bdev: &str) -> Result<(Blobstore, blobfs::LoadReport), blobfs::BlobError> {
        let home = self.reactors[0].handle();
        let reg = self.registry.clone();
        let bdev = bdev.to_string();
        self.run(async move { Blobstore::load(&reg, &bdev, home).await })
    }

    pub fn channel(&mut self, store: &Blobstore, reactor: usize) -> BlobChannel {
        self.reactors[reactor].with_ctx(|ctx| store.channel(ctx)).unwrap()
    }

    /// Submits `io` on `ch` and steps until it completes.
    pub fn io(&mut self, ch: &BlobChannel, io: BlobIo) -> BlobCompletion {
        ch.submit(self.now, io);
        let mut out = Vec::new();
        for _ in 0..1_000_000 {
            self.step();
            if ch.poll(self.now, &mut out) > 0 {
                return out.pop().unwrap();
            }
        }
        panic!("a blob request did not complete");
    }

    pub fn write(&mut self, ch: &BlobChannel, blob: &Arc<BlobShared>, page: u64, data: &[u8]) -> Result<(), IoError> {
        self.io(ch, BlobIo::write(blob, page, DmaBuf::copy_from(data).unwrap(), 0)).status
    }

    pub fn read(
        &mut self,
        ch: &BlobChannel,
        blob: &Arc<BlobShared>,
        page: u64,
        pages: usize,
    ) -> Result<Vec<u8>, IoError> {
        let c = self.io(ch, BlobIo::read(blob, page, DmaBuf::new(pages * PAGE).unwrap(), 0));
        c.status.map(|()| {
            let mut v = vec![0; pages * PAGE];
            c.bufs.copy_out(0, &mut v);
            v
        })
    }

    pub fn flush(&mut self, ch: &BlobChannel, blob: &Arc<BlobShared>) -> Result<(), IoError> {
        self.io(ch, BlobIo::flush(blob, 0)).status
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}
