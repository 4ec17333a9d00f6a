//! Fuzzes loading a blobstore from a damaged or random image: the super
//! blocks, the checkpoint, the journal replay and the checks of every decoder.
//! Loading must fail with an error or succeed; it must never panic or hang,
//! and a store that loads must pass its own consistency check or report why.
//!
//! Input: first byte 0 → the rest is written raw over the start of the device
//! (random images); otherwise → (3-byte offset, byte) patches applied to a
//! valid dirty store image (mutated images).
#![no_main]

use std::future::Future;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use nvme::{BdevRegistry, Io, malloc};
use pmd::{DmaBuf, Reactor};

static BASE: &[u8] = include_bytes!("../base.img");

fn run<F: Future>(reactor: &mut Reactor, now: &mut u64, f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..200_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        *now += 1000;
        reactor.poll(*now, 64);
    }
    panic!("loading did not finish in 200,000 rounds: a hang");
}

fuzz_target!(|data: &[u8]| {
    let mut image = BASE.to_vec();
    match data.split_first() {
        Some((0, raw)) => image[..raw.len().min(BASE.len())].copy_from_slice(&raw[..raw.len().min(BASE.len())]),
        Some((_, patches)) => {
            for p in patches.chunks_exact(4) {
                let at = (u32::from_le_bytes([p[0], p[1], p[2], 0]) as usize) % image.len();
                image[at] = p[3];
            }
        }
        None => {}
    }
    let mut reactor = Reactor::group(1).pop().unwrap();
    let mut now = 0;
    let registry = BdevRegistry::new();
    let pages = (BASE.len() / 4096) as u64;
    malloc::create(&registry, &malloc::MallocConfig { name: "M0".into(), num_blocks: pages, block_size: 4096, uuid: None }).unwrap();
    {
        let desc = registry.open("M0", true).unwrap();
        let mut ch = reactor.with_ctx(|ctx| desc.channel(ctx)).unwrap();
        ch.submit(now, Io::write(0, DmaBuf::copy_from(&image).unwrap(), 0));
        let mut out = Vec::new();
        while ch.poll(now, &mut out) == 0 {
            now += 1;
        }
    }
    let home = reactor.handle();
    let reg = registry.clone();
    let loaded = run(&mut reactor, &mut now, async move { blobfs::Blobstore::load(&reg, "M0", home).await }).unwrap();
    if let Ok((store, _report)) = loaded {
        let s = store.clone();
        let _ = run(&mut reactor, &mut now, async move {
            let list = s.list().await?;
            for b in &list {
                let _ = s.xattrs(b.id).await?;
            }
            s.check().await
        });
        let s = store.clone();
        run(&mut reactor, &mut now, async move { s.abandon().await });
    }
});
