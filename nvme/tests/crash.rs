//! The crash bdev's model: what survives a power cut.

mod common;

use common::{Harness, pattern};
use nvme::crash::{self, CrashConfig, PowerCutConfig, PowerCutMode, PowerState};
use nvme::{BdevChannel, Io, IoError, malloc};
use pmd::DmaBuf;
use proptest::prelude::*;

const BS: usize = 512;

fn setup(blocks: u64) -> (Harness, BdevChannel) {
    let mut h = Harness::new();
    malloc::create(
        &h.registry,
        &malloc::MallocConfig { name: "m0".into(), num_blocks: blocks, block_size: BS as u32, uuid: None },
    )
    .unwrap();
    crash::create(&h.registry, &CrashConfig { name: "c0".into(), base_name: "m0".into(), uuid: None }).unwrap();
    let ch = h.channel("c0", true);
    (h, ch)
}

/// Cuts power and polls until the base holds the crash image.
fn cut(h: &mut Harness, ch: &mut BdevChannel, mode: PowerCutMode, seed: u64) {
    crash::power_cut(&h.registry, &PowerCutConfig { name: "c0".into(), mode, seed }).unwrap();
    for _ in 0..100_000 {
        h.settle(ch);
        if crash::status(&h.registry, "c0").unwrap().state == PowerState::Off {
            return;
        }
    }
    panic!("the power cut did not finish");
}

/// The base's content (read-only: the crash bdev holds the claim).
fn base_image(h: &mut Harness, blocks: u64) -> Vec<u8> {
    let mut base = h.channel("m0", false);
    h.read(&mut base, 0, blocks as usize * BS).unwrap()
}

#[test]
fn unflushed_writes_are_lost_and_flushed_ones_kept() {
    let (mut h, mut ch) = setup(8);
    h.write(&mut ch, 0, &[1; BS]).unwrap();
    h.flush(&mut ch).unwrap();
    h.write(&mut ch, 1, &[2; BS]).unwrap();
    h.write(&mut ch, 0, &[3; BS]).unwrap();
    assert_eq!(h.read(&mut ch, 0, 2 * BS).unwrap(), [[3; BS], [2; BS]].concat(), "reads see the cache");
    assert_eq!(crash::status(&h.registry, "c0").unwrap().unflushed_blocks, 2);
    cut(&mut h, &mut ch, PowerCutMode::Drop, 0);
    let img = base_image(&mut h, 2);
    assert_eq!(img, [[1; BS], [0; BS]].concat());
    let status = crash::status(&h.registry, "c0").unwrap();
    assert_eq!((status.cuts, status.last_cut_survivors, status.last_cut_dropped), (1, 0, 2));
}

#[test]
fn keep_mode_keeps_the_newest_versions() {
    let (mut h, mut ch) = setup(8);
    h.write(&mut ch, 2, &[5; 2 * BS]).unwrap();
    h.write(&mut ch, 3, &[6; BS]).unwrap();
    h.run(&mut ch, Io::unmap(4, 1, 0));
    cut(&mut h, &mut ch, PowerCutMode::Keep, 0);
    assert_eq!(base_image(&mut h, 5)[2 * BS..], [[5; BS], [6; BS], [0; BS]].concat());
}

#[test]
fn fua_writes_are_durable_when_they_complete() {
    let (mut h, mut ch) = setup(8);
    let c = h.run(&mut ch, Io::write(0, DmaBuf::copy_from(&[7; BS]).unwrap(), 0).with_fua(true));
    assert_eq!(c.status, Ok(()));
    h.write(&mut ch, 1, &[8; BS]).unwrap();
    cut(&mut h, &mut ch, PowerCutMode::Drop, 0);
    assert_eq!(base_image(&mut h, 2), [[7; BS], [0; BS]].concat());
}

#[test]
fn a_cut_bdev_fails_requests_until_powered_on() {
    let (mut h, mut ch) = setup(8);
    h.write(&mut ch, 0, &[1; BS]).unwrap();
    cut(&mut h, &mut ch, PowerCutMode::Keep, 0);
    assert_eq!(h.read(&mut ch, 0, BS), Err(IoError::Removed));
    assert_eq!(h.flush(&mut ch), Err(IoError::Removed));
    let err = crash::power_cut(&h.registry, &PowerCutConfig { name: "c0".into(), mode: PowerCutMode::Drop, seed: 0 })
        .unwrap_err();
    assert!(err.to_string().contains("not on"), "{err}");
    crash::power_on(&h.registry, "c0").unwrap();
    assert_eq!(h.read(&mut ch, 0, BS).unwrap(), vec![1; BS]);
    assert!(crash::power_on(&h.registry, "c0").is_err());
}

#[test]
fn the_cache_outlives_a_closed_channel_and_one_channel_at_a_time() {
    let (mut h, mut ch) = setup(8);
    h.write(&mut ch, 0, &[4; BS]).unwrap();
    let desc = h.registry.open("c0", true).unwrap();
    let err = h.reactor.with_ctx(|ctx| desc.channel(ctx)).unwrap_err();
    assert!(err.to_string().contains("one channel at a time"), "{err}");
    drop(ch);
    let mut ch = h.channel("c0", true);
    assert_eq!(h.read(&mut ch, 0, BS).unwrap(), vec![4; BS]);
    h.flush(&mut ch).unwrap();
    cut(&mut h, &mut ch, PowerCutMode::Drop, 0);
    assert_eq!(base_image(&mut h, 1), vec![4; BS]);
}

#[test]
fn a_cut_requested_with_no_channel_happens_on_the_next_one() {
    let (mut h, mut ch) = setup(8);
    h.write(&mut ch, 0, &[4; BS]).unwrap();
    drop(ch);
    crash::power_cut(&h.registry, &PowerCutConfig { name: "c0".into(), mode: PowerCutMode::Keep, seed: 0 }).unwrap();
    let mut ch = h.channel("c0", true);
    while crash::status(&h.registry, "c0").unwrap().state != PowerState::Off {
        h.settle(&mut ch);
    }
    assert_eq!(base_image(&mut h, 1), vec![4; BS]);
}

/// Runs writes and flushes, cuts at random, and checks every block holds a
/// value the model allows: its last flushed value or any value written since.
fn random_workload(ops: &[(u8, u8, u8)], seed: u64) -> (Vec<u8>, Vec<Vec<Vec<u8>>>) {
    const BLOCKS: u64 = 16;
    let (mut h, mut ch) = setup(BLOCKS);
    let mut durable: Vec<Vec<u8>> = vec![vec![0; BS]; BLOCKS as usize];
    let mut since: Vec<Vec<Vec<u8>>> = vec![Vec::new(); BLOCKS as usize];
    for (i, &(kind, block, len)) in ops.iter().enumerate() {
        let block = block as u64 % BLOCKS;
        let len = (len as u64 % 4 + 1).min(BLOCKS - block);
        if kind % 5 == 0 {
            h.flush(&mut ch).unwrap();
            for b in 0..BLOCKS as usize {
                if let Some(last) = since[b].pop() {
                    durable[b] = last;
                }
                since[b].clear();
            }
        } else {
            let data = pattern(i as u64 + 1, len as usize * BS);
            h.write(&mut ch, block, &data).unwrap();
            for j in 0..len as usize {
                since[block as usize + j].push(data[j * BS..(j + 1) * BS].to_vec());
            }
        }
    }
    cut(&mut h, &mut ch, PowerCutMode::Random, seed);
    let image = base_image(&mut h, BLOCKS);
    let allowed = (0..BLOCKS as usize)
        .map(|b| std::iter::once(durable[b].clone()).chain(since[b].iter().cloned()).collect())
        .collect();
    (image, allowed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn every_block_after_a_cut_is_a_value_the_model_allows(ops in proptest::collection::vec(any::<(u8, u8, u8)>(), 1..40), seed in any::<u64>()) {
        let (image, allowed) = random_workload(&ops, seed);
        for (b, choices) in allowed.iter().enumerate() {
            let got = &image[b * BS..(b + 1) * BS];
            prop_assert!(choices.iter().any(|c| c == got), "block {b} holds a value never written or already superseded by a flush");
        }
        let (again, _) = random_workload(&ops, seed);
        prop_assert_eq!(image, again, "the same seed gives the same image");
    }
}

#[test]
fn random_cuts_produce_torn_multi_block_writes() {
    // Over many seeds, an unflushed 8-block write must sometimes survive in part.
    let mut partial = 0;
    for seed in 0..64 {
        let (mut h, mut ch) = setup(8);
        h.write(&mut ch, 0, &[9; 8 * BS]).unwrap();
        cut(&mut h, &mut ch, PowerCutMode::Random, seed);
        let img = base_image(&mut h, 8);
        let kept = img.chunks(BS).filter(|c| c[0] == 9).count();
        if kept > 0 && kept < 8 {
            partial += 1;
        }
    }
    assert!(partial > 32, "only {partial} of 64 cuts tore the write");
}
