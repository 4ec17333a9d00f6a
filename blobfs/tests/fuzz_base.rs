//! The base image of the `load_image` fuzz target: a small dirty store with
//! blobs, a snapshot, xattrs and journal records. This test checks that the
//! committed image still loads (so a format change that breaks old stores is
//! noticed); `BLOBFS_WRITE_FUZZ_BASE=1` writes it anew.

mod common;

use std::collections::BTreeMap;

use blobfs::{BlobError, BlobOptions};
use common::{Harness, PAGE, pattern};
use nvme::Io;
use pmd::DmaBuf;

/// 256 KiB: 64 clusters of 4 KiB, 16 journal pages.
const PAGES: u64 = 64;

fn base_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/base.img")
}

fn image_of(h: &mut Harness) -> Vec<u8> {
    let desc = h.registry.open("M0", false).unwrap();
    let mut ch = h.reactors[0].with_ctx(|ctx| desc.channel(ctx)).unwrap();
    ch.submit(h.now, Io::read(0, DmaBuf::new(PAGES as usize * PAGE).unwrap(), 0));
    let mut out = Vec::new();
    while ch.poll(h.now, &mut out) == 0 {
        h.step();
    }
    out.pop().unwrap().bufs.into_one().unwrap().to_vec()
}

fn small_store() -> Harness {
    let h = Harness::new(1);
    nvme::malloc::create(
        &h.registry,
        &nvme::malloc::MallocConfig { name: "M0".into(), num_blocks: PAGES, block_size: 4096, uuid: None },
    )
    .unwrap();
    h
}

#[test]
fn the_committed_fuzz_base_image_loads() {
    if std::env::var_os("BLOBFS_WRITE_FUZZ_BASE").is_some() {
        let mut h = small_store();
        let store = h.format("M0", 4096, Some(16));
        let s = store.clone();
        let (a, b) = h
            .run(async move {
                let a = s
                    .create_blob(BlobOptions {
                        num_clusters: 3,
                        thin: false,
                        xattrs: [("name".into(), "a".into())].into(),
                        ..Default::default()
                    })
                    .await?;
                let b = s.create_blob(BlobOptions { num_clusters: 8, thin: true, ..Default::default() }).await?;
                Ok::<_, BlobError>((a, b))
            })
            .unwrap();
        let ch = h.channel(&store, 0);
        let s = store.clone();
        let blob_b = h.run(async move { s.open_blob(b).await }).unwrap();
        h.write(&ch, blob_b.shared(), 2, &pattern(1, 2 * PAGE)).unwrap();
        let s = store.clone();
        h.run(async move {
            s.snapshot(b, BTreeMap::new()).await?;
            s.set_xattr(a, "k", b"v").await?;
            s.sync_blob(a).await?;
            s.set_super(Some(a)).await
        })
        .unwrap();
        h.write(&ch, blob_b.shared(), 5, &pattern(2, PAGE)).unwrap();
        drop((blob_b, ch));
        let s = store.clone();
        h.run(async move { s.abandon().await });
        std::fs::write(base_path(), image_of(&mut h)).unwrap();
    }
    let image = std::fs::read(base_path()).expect("blobfs/fuzz/base.img (BLOBFS_WRITE_FUZZ_BASE=1 writes it)");
    assert_eq!(image.len(), PAGES as usize * PAGE);
    let mut h = small_store();
    let desc = h.registry.open("M0", true).unwrap();
    let mut ch = h.reactors[0].with_ctx(|ctx| desc.channel(ctx)).unwrap();
    ch.submit(h.now, Io::write(0, DmaBuf::copy_from(&image).unwrap(), 0));
    let mut out = Vec::new();
    while ch.poll(h.now, &mut out) == 0 {
        h.step();
    }
    drop((ch, desc));
    let (store, report) = h.load("M0").unwrap();
    assert!(!report.clean && report.replayed_records > 0, "{report:?}");
    let s = store.clone();
    let (list, sup, problems) =
        h.run(async move { Ok::<_, BlobError>((s.list().await?, s.get_super().await?, s.check().await?)) }).unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(sup, Some(1));
    assert!(problems.is_empty(), "{problems:?}");
}
