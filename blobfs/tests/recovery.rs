//! Loading after a crash, checkpoints, and damaged metadata of every kind.

mod common;

use blobfs::format::{PAGE_SIZE, Seed, SuperBlock, decode_page};
use blobfs::{BlobError, BlobOptions, Blobstore};
use common::{Harness, PAGE};
use nvme::{Io, malloc};
use pmd::DmaBuf;

const CLUSTER: u32 = 64 * 1024;

/// Reads device page `page` of M0 (the store must not hold it).
fn raw_read(h: &mut Harness, page: u64) -> Vec<u8> {
    let desc = h.registry.open("M0", false).unwrap();
    let mut ch = h.reactors[0].with_ctx(|ctx| desc.channel(ctx)).unwrap();
    ch.submit(h.now, Io::read(page, DmaBuf::new(PAGE).unwrap(), 0));
    let mut out = Vec::new();
    while ch.poll(h.now, &mut out) == 0 {
        h.step();
    }
    out.pop().unwrap().bufs.into_one().unwrap().to_vec()
}

fn raw_write(h: &mut Harness, page: u64, data: &[u8]) {
    let desc = h.registry.open("M0", true).unwrap();
    let mut ch = h.reactors[0].with_ctx(|ctx| desc.channel(ctx)).unwrap();
    ch.submit(h.now, Io::write(page, DmaBuf::copy_from(data).unwrap(), 0));
    let mut out = Vec::new();
    while ch.poll(h.now, &mut out) == 0 {
        h.step();
    }
    assert!(out[0].status.is_ok());
}

fn flip(h: &mut Harness, page: u64, byte: usize) {
    let mut p = raw_read(h, page);
    p[byte] ^= 0x5a;
    raw_write(h, page, &p);
}

/// The super block copy with the higher commit number, and its page.
fn newest_super(h: &mut Harness) -> (u64, SuperBlock) {
    let mut best = None;
    for page in 0..2 {
        let raw = raw_read(h, page);
        if let Ok((hdr, body)) = decode_page(&raw, Seed::NONE) {
            let sb = SuperBlock::decode(body).unwrap();
            if best.as_ref().is_none_or(|(s, _, _)| hdr.seq > *s) {
                best = Some((hdr.seq, page, sb));
            }
        }
    }
    let (_, page, sb) = best.unwrap();
    (page, sb)
}

fn create(h: &mut Harness, store: &Blobstore, thin: bool, name: &str) -> u64 {
    let s = store.clone();
    let xattrs = [("name".to_string(), name.to_string())].into();
    h.run(async move { s.create_blob(BlobOptions { num_clusters: 2, thin, xattrs, ..Default::default() }).await })
        .unwrap()
}

fn names(h: &mut Harness, store: &Blobstore) -> Vec<String> {
    let s = store.clone();
    h.run(async move {
        let mut out = Vec::new();
        for b in s.list().await? {
            out.push(String::from_utf8(s.xattrs(b.id).await?["name"].clone()).unwrap());
        }
        Ok::<_, BlobError>(out)
    })
    .unwrap()
}

#[test]
fn a_dirty_load_keeps_what_was_synced_and_drops_what_was_not() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let a = create(&mut h, &store, false, "a");
    let b = create(&mut h, &store, true, "b");
    let s = store.clone();
    h.run(async move {
        s.set_xattr(a, "synced", b"yes").await?;
        s.sync_blob(a).await?;
        s.set_xattr(b, "unsynced", b"lost").await?;
        s.resize_blob(b, 9).await
    })
    .unwrap();
    let s = store.clone();
    h.run(async move { s.abandon().await });
    let (store, report) = h.load(&bdev).unwrap();
    assert!(!report.clean);
    assert!(report.replayed_records >= 3, "{report:?}");
    let s = store.clone();
    let (xa, xb, ib) =
        h.run(async move { Ok::<_, BlobError>((s.xattrs(a).await?, s.xattrs(b).await?, s.info(b).await?)) }).unwrap();
    assert_eq!(xa.get("synced").map(Vec::as_slice), Some(&b"yes"[..]));
    assert!(!xb.contains_key("unsynced"));
    assert_eq!(ib.num_clusters, 2, "the unsynced resize is gone");
    let s = store.clone();
    let problems = h.run(async move { s.check().await }).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn a_small_journal_checkpoints_and_loads_clean_and_dirty() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, Some(16));
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(create(&mut h, &store, i % 2 == 0, &format!("b{i}")));
    }
    let s = store.clone();
    let stats = h.run(async move { s.stats().await }).unwrap();
    assert!(stats.ops.checkpoints >= 3, "{:?}", stats.ops);
    let s = store.clone();
    h.run(async move { s.abandon().await });
    let (store, report) = h.load(&bdev).unwrap();
    assert!(!report.clean);
    assert_eq!(report.blobs, 60);
    let expect: Vec<String> = (0..60).map(|i| format!("b{i}")).collect();
    assert_eq!(names(&mut h, &store), expect);
    let s = store.clone();
    h.run(async move { s.unload().await }).unwrap();
    let (store, report) = h.load(&bdev).unwrap();
    assert!(report.clean && report.replayed_records == 0, "{report:?}");
    assert_eq!(names(&mut h, &store), expect);
}

#[test]
fn a_damaged_newest_super_block_falls_back_to_the_other_copy() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    create(&mut h, &store, true, "x");
    let s = store.clone();
    h.run(async move { s.unload().await }).unwrap();
    let (page, _) = newest_super(&mut h);
    flip(&mut h, page, 200);
    let (store, report) = h.load(&bdev).unwrap();
    let why = report.used_older_super.clone().expect("the older copy was used");
    assert!(why.contains(&format!("copy {page}: checksum mismatch")), "{why}");
    assert_eq!(names(&mut h, &store), vec!["x"]);
}

#[test]
fn both_super_blocks_damaged_or_never_written_is_not_a_blobstore() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let err = h.load(&bdev).unwrap_err();
    assert!(matches!(err, BlobError::NotABlobstore { .. }), "{err}");
    assert!(err.to_string().contains("copy 0: no metadata page here"), "{err}");
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    h.run(async move { s.unload().await }).unwrap();
    flip(&mut h, 0, 50);
    flip(&mut h, 1, 60);
    let err = h.load(&bdev).unwrap_err().to_string();
    assert!(err.contains("copy 0: checksum mismatch") && err.contains("copy 1: checksum mismatch"), "{err}");
}

#[test]
fn a_damaged_checkpoint_page_is_refused_with_its_location() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    create(&mut h, &store, false, "x");
    let s = store.clone();
    h.run(async move { s.unload().await }).unwrap();
    let (_, sb) = newest_super(&mut h);
    let first = sb.checkpoint.page_numbers(&sb.geometry).next().unwrap();
    flip(&mut h, first, 1000);
    let err = h.load(&bdev).unwrap_err();
    assert!(matches!(err, BlobError::Corrupt { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("checkpoint {} page 0 (device page {first})", sb.checkpoint.generation)), "{text}");
    assert!(text.contains("checksum mismatch"), "{text}");
}

#[test]
fn journal_damage_is_refused_but_a_torn_tail_is_not() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    for n in ["a", "b", "c"] {
        create(&mut h, &store, true, n);
    }
    let s = store.clone();
    h.run(async move { s.abandon().await });
    let (_, sb) = newest_super(&mut h);
    let journal = sb.geometry.journal_start + sb.replay.page;
    // The last record ("c") torn: it was never acknowledged; a and b remain.
    flip(&mut h, journal + 2, 300);
    let (store, report) = h.load(&bdev).unwrap();
    assert!(report.replay_stopped.contains("checksum"), "{report:?}");
    assert_eq!(names(&mut h, &store), vec!["a", "b"]);
    let s = store.clone();
    h.run(async move { s.abandon().await });
    // Now damage "a"'s record, with "b" written after it: corruption.
    let (_, sb) = newest_super(&mut h);
    let journal = sb.geometry.journal_start + sb.replay.page;
    flip(&mut h, journal, 300);
    let err = h.load(&bdev).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, BlobError::Corrupt { .. }), "{text}");
    assert!(text.contains("journal page") && text.contains("later write"), "{text}");
}

#[test]
fn the_offline_check_reports_a_healthy_store_and_a_damaged_one() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    create(&mut h, &store, false, "x");
    let s = store.clone();
    let home = h.reactors[0].handle();
    let reg = h.registry.clone();
    let err = h.run(async move { Blobstore::check_offline(&reg, "M0", home).await }).unwrap_err();
    assert!(err.to_string().contains("claimed by blobstore; unload the blobstore first"), "{err}");
    h.run(async move { s.abandon().await });
    let (home, reg) = (h.reactors[0].handle(), h.registry.clone());
    let report = h.run(async move { Blobstore::check_offline(&reg, "M0", home).await }).unwrap();
    assert!(report.consistent, "{report:?}");
    assert!(report.load.as_ref().is_some_and(|l| !l.clean && l.blobs == 1));
    assert!(report.used_clusters > 2);
    // Checking writes nothing: the store is still dirty afterwards.
    let (_, sb) = newest_super(&mut h);
    assert!(!sb.clean);
    let first = sb.checkpoint.page_numbers(&sb.geometry).next().unwrap();
    flip(&mut h, first, 77);
    let (home, reg) = (h.reactors[0].handle(), h.registry.clone());
    let report = h.run(async move { Blobstore::check_offline(&reg, "M0", home).await }).unwrap();
    assert!(!report.consistent);
    assert!(report.problems[0].contains(&format!("device page {first}")), "{report:?}");
}

#[test]
fn a_bdev_of_another_size_or_block_size_is_refused() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    h.run(async move { s.unload().await }).unwrap();
    let image: Vec<Vec<u8>> = (0..2).map(|p| raw_read(&mut h, p)).collect();
    malloc::create(
        &h.registry,
        &malloc::MallocConfig { name: "Small".into(), num_blocks: 256, block_size: 4096, uuid: None },
    )
    .unwrap();
    let desc = h.registry.open("Small", true).unwrap();
    let mut ch = h.reactors[0].with_ctx(|ctx| desc.channel(ctx)).unwrap();
    ch.submit(h.now, Io::write(0, DmaBuf::copy_from(&image.concat()).unwrap(), 0));
    let mut out = Vec::new();
    while ch.poll(h.now, &mut out) == 0 {
        h.step();
    }
    drop((ch, desc));
    let err = h.load("Small").unwrap_err().to_string();
    assert!(
        err.contains("holds no ClaudeFS blobstore") && err.contains("formatted for 256 clusters of 65536 bytes"),
        "{err}"
    );
    assert_eq!(PAGE_SIZE, PAGE);
}
