//! Blob operations end to end on a malloc bdev: format, load, data, thin
//! provisioning, snapshots and clones, space, metadata limits.

mod common;

use std::collections::BTreeMap;

use blobfs::{BlobError, BlobIo, BlobOptions};
use common::{Harness, PAGE, pattern};
use nvme::IoError;

const CLUSTER: u32 = 64 * 1024; // 16 pages

fn opts(clusters: u64, thin: bool) -> BlobOptions {
    BlobOptions { num_clusters: clusters, thin, ..Default::default() }
}

#[test]
fn data_and_metadata_survive_a_clean_unload() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    let id = h
        .run(async move {
            s.create_blob(BlobOptions { xattrs: [("name".into(), "log".into())].into(), ..opts(4, false) }).await
        })
        .unwrap();
    let s = store.clone();
    let blob = h.run(async move { s.open_blob(id).await }).unwrap();
    let ch = h.channel(&store, 0);
    let data = pattern(1, 20 * PAGE); // crosses a cluster boundary
    h.write(&ch, blob.shared(), 10, &data).unwrap();
    assert_eq!(h.read(&ch, blob.shared(), 10, 20).unwrap(), data);
    let s = store.clone();
    h.run(async move {
        s.set_xattr(id, "owner", b"raft").await?;
        s.set_super(Some(id)).await?;
        blob.close().await
    })
    .unwrap();
    drop(ch);
    let s = store.clone();
    h.run(async move { s.unload().await }).unwrap();

    let (store, report) = h.load(&bdev).unwrap();
    assert!(report.clean, "{report:?}");
    assert_eq!(report.replayed_records, 0);
    let s = store.clone();
    let (info, xattrs, sup) = h
        .run(async move { Ok::<_, BlobError>((s.info(id).await?, s.xattrs(id).await?, s.get_super().await?)) })
        .unwrap();
    assert_eq!((info.num_clusters, info.allocated_clusters, info.thin), (4, 4, false));
    assert_eq!(xattrs.get("name").map(Vec::as_slice), Some(&b"log"[..]));
    assert_eq!(xattrs.get("owner").map(Vec::as_slice), Some(&b"raft"[..]));
    assert_eq!(sup, Some(id));
    let s = store.clone();
    let blob = h.run(async move { s.open_blob(id).await }).unwrap();
    let ch = h.channel(&store, 0);
    assert_eq!(h.read(&ch, blob.shared(), 10, 20).unwrap(), data);
    assert_eq!(h.read(&ch, blob.shared(), 0, 10).unwrap(), vec![0; 10 * PAGE], "thick clusters start zeroed");
}

#[test]
fn thin_blobs_allocate_on_first_write_and_read_zeros_elsewhere() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    let (id, free_before) = h
        .run(async move {
            let id = s.create_blob(opts(1000, true)).await?;
            Ok::<_, BlobError>((id, s.stats().await?.free_clusters))
        })
        .unwrap();
    let s = store.clone();
    let blob = h.run(async move { s.open_blob(id).await }).unwrap();
    let ch = h.channel(&store, 0);
    assert_eq!(h.read(&ch, blob.shared(), 5000, 3).unwrap(), vec![0; 3 * PAGE]);
    h.write(&ch, blob.shared(), 5001, &[7; PAGE]).unwrap();
    let got = h.read(&ch, blob.shared(), 5000, 3).unwrap();
    assert_eq!(got, [vec![0; PAGE], vec![7; PAGE], vec![0; PAGE]].concat(), "the rest of the new cluster reads zeros");
    let s = store.clone();
    let (info, free_after) =
        h.run(async move { Ok::<_, BlobError>((s.info(id).await?, s.stats().await?.free_clusters)) }).unwrap();
    assert_eq!(info.allocated_clusters, 1);
    assert_eq!(free_before - free_after, 1);
    // Unmap and write-zeroes of clusters nobody has are no-ops; requests beyond the end fail.
    assert!(h.io(&ch, BlobIo::unmap(blob.shared(), 0, 16, 0)).status.is_ok());
    assert!(h.io(&ch, BlobIo::write_zeroes(blob.shared(), 5001, 1, 0)).status.is_ok());
    assert_eq!(h.read(&ch, blob.shared(), 5001, 1).unwrap(), vec![0; PAGE]);
    assert_eq!(h.read(&ch, blob.shared(), 16_000, 1), Err(IoError::OutOfRange));
    assert_eq!(h.write(&ch, blob.shared(), 0, &[1; 100]), Err(IoError::Invalid));
}

#[test]
fn no_zero_blobs_take_clusters_unzeroed_and_first_writes_share_a_record() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    // Clusters that held data: a thick blob written, then deleted.
    let s = store.clone();
    let old = h.run(async move { s.open_blob(s.create_blob(opts(8, false)).await?).await }).unwrap();
    let ch = h.channel(&store, 0);
    h.write(&ch, old.shared(), 0, &[0xee; 8 * 16 * PAGE]).unwrap();
    let (s, id) = (store.clone(), old.shared().id());
    h.run(async move {
        old.close().await?;
        s.delete_blob(id).await
    })
    .unwrap();
    for _ in 0..50 {
        h.step(); // the release waits for a quiesce barrier
    }
    let s = store.clone();
    let (id, before) = h
        .run(async move {
            let id = s.create_blob(BlobOptions { no_zero: true, ..opts(64, true) }).await?;
            Ok::<_, BlobError>((id, s.stats().await?.ops))
        })
        .unwrap();
    let s = store.clone();
    let blob = h.run(async move { s.open_blob(id).await }).unwrap();
    // Eight first writes to eight clusters in flight at once.
    for c in 0..8u64 {
        ch.submit(
            h.now,
            BlobIo::write(blob.shared(), c * 16, pmd::DmaBuf::copy_from(&[c as u8 + 1; PAGE]).unwrap(), c),
        );
    }
    let mut done = Vec::new();
    while done.len() < 8 {
        h.step();
        ch.poll(h.now, &mut done);
    }
    assert!(done.iter().all(|c| c.status.is_ok()), "{:?}", done.iter().map(|c| c.status).collect::<Vec<_>>());
    let s = store.clone();
    let (info, after) = h.run(async move { Ok::<_, BlobError>((s.info(id).await?, s.stats().await?.ops)) }).unwrap();
    assert!(info.no_zero && info.thin);
    assert_eq!((info.allocated_clusters, after.allocations - before.allocations), (8, 8));
    assert!(after.records - before.records < 8, "eight allocations in {} records", after.records - before.records);
    let mut stale = 0;
    for c in 0..8u64 {
        assert_eq!(h.read(&ch, blob.shared(), c * 16, 1).unwrap(), vec![c as u8 + 1; PAGE], "what was written");
        stale += h.read(&ch, blob.shared(), c * 16 + 1, 1).unwrap().iter().filter(|&&b| b == 0xee).count();
    }
    assert!(stale > 0, "the rest of each cluster is what it held (not zeroed)");
    // The flag is durable.
    let (s, b) = (store.clone(), blob);
    h.run(async move { b.close().await }).unwrap();
    h.run(async move { s.unload().await }).unwrap();
    let (store, _) = h.load(&bdev).unwrap();
    let s = store.clone();
    assert!(h.run(async move { s.info(id).await }).unwrap().no_zero);
}

#[test]
fn space_runs_out_cleanly_and_comes_back() {
    let (mut h, bdev) = Harness::with_malloc(1, 8, false);
    let store = h.format(&bdev, CLUSTER, Some(64));
    let s = store.clone();
    let free = h.run(async move { s.stats().await }).unwrap().free_clusters;
    let s = store.clone();
    let big = h.run(async move { s.create_blob(opts(free - 4, false)).await }).unwrap();
    let s = store.clone();
    let err = h.run(async move { s.create_blob(opts(8, false)).await }).unwrap_err();
    assert!(matches!(err, BlobError::NoSpace { needed: 8, .. }), "{err}");
    // A thin blob's first writes take the last clusters, then get NoSpace.
    let s = store.clone();
    let thin = h.run(async move { s.create_blob(opts(100, true)).await }).unwrap();
    let s = store.clone();
    let blob = h.run(async move { s.open_blob(thin).await }).unwrap();
    let ch = h.channel(&store, 0);
    let mut results = Vec::new();
    for c in 0..8 {
        results.push(h.write(&ch, blob.shared(), c * 16, &[c as u8; PAGE]));
    }
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!((1..8).contains(&ok), "{results:?}");
    assert!(results.iter().skip(ok).all(|r| *r == Err(IoError::NoSpace)), "{results:?}");
    for c in 0..ok as u64 {
        assert_eq!(h.read(&ch, blob.shared(), c * 16, 1).unwrap(), vec![c as u8; PAGE], "earlier data intact");
    }
    // Deleting frees the space for good.
    let s = store.clone();
    h.run(async move { s.delete_blob(big).await }).unwrap();
    for _ in 0..50 {
        h.step(); // the release waits for a quiesce barrier
    }
    assert!(h.write(&ch, blob.shared(), 7 * 16, &[9; PAGE]).is_ok());
    let s = store.clone();
    let problems = h.run(async move { s.check().await }).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn resize_grows_and_shrinks_and_frees_at_sync() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    let (id, free0) = h
        .run(async move {
            let id = s.create_blob(opts(2, false)).await?;
            Ok::<_, BlobError>((id, s.stats().await?.free_clusters))
        })
        .unwrap();
    let s = store.clone();
    h.run(async move { s.resize_blob(id, 10).await }).unwrap();
    let s = store.clone();
    let free1 = h.run(async move { s.stats().await }).unwrap().free_clusters;
    assert_eq!(free0 - free1, 8);
    let s = store.clone();
    h.run(async move {
        s.resize_blob(id, 1).await?;
        s.sync_blob(id).await
    })
    .unwrap();
    for _ in 0..50 {
        h.step();
    }
    let s = store.clone();
    let (info, free2) =
        h.run(async move { Ok::<_, BlobError>((s.info(id).await?, s.stats().await?.free_clusters)) }).unwrap();
    assert_eq!((info.num_clusters, info.allocated_clusters, info.dirty), (1, 1, false));
    assert_eq!(free2, free0 + 1);
    let s = store.clone();
    let err = h.run(async move { s.resize_blob(id, u64::MAX / 2).await }).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
}

#[test]
fn snapshots_freeze_data_and_clones_copy_on_write() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    let id = h.run(async move { s.create_blob(opts(3, false)).await }).unwrap();
    let s = store.clone();
    let origin = h.run(async move { s.open_blob(id).await }).unwrap();
    let ch = h.channel(&store, 0);
    let v1 = pattern(1, 48 * PAGE);
    h.write(&ch, origin.shared(), 0, &v1).unwrap();
    let s = store.clone();
    let snap = h.run(async move { s.snapshot(id, BTreeMap::new()).await }).unwrap();
    // The origin now reads through the snapshot; a partial write copies the rest of the cluster.
    h.write(&ch, origin.shared(), 20, &[1; PAGE]).unwrap();
    let mut expect = v1.clone();
    expect[20 * PAGE..21 * PAGE].fill(1);
    assert_eq!(h.read(&ch, origin.shared(), 0, 48).unwrap(), expect);
    let s = store.clone();
    let snap_blob = h.run(async move { s.open_blob(snap).await }).unwrap();
    assert_eq!(h.read(&ch, snap_blob.shared(), 0, 48).unwrap(), v1, "the snapshot keeps the old data");
    assert_eq!(h.write(&ch, snap_blob.shared(), 0, &[2; PAGE]), Err(IoError::ReadOnly));
    // A clone of the snapshot.
    let s = store.clone();
    let clone = h.run(async move { s.clone_blob(snap, BTreeMap::new()).await }).unwrap();
    let s = store.clone();
    let clone_blob = h.run(async move { s.open_blob(clone).await }).unwrap();
    assert_eq!(h.read(&ch, clone_blob.shared(), 0, 48).unwrap(), v1);
    h.write(&ch, clone_blob.shared(), 40, &[3; PAGE]).unwrap();
    assert_eq!(h.read(&ch, snap_blob.shared(), 40, 1).unwrap(), v1[40 * PAGE..41 * PAGE]);
    let s = store.clone();
    let infos = h.run(async move { s.list().await }).unwrap();
    let snap_info = infos.iter().find(|i| i.id == snap).unwrap();
    assert!(snap_info.snapshot && snap_info.read_only);
    assert_eq!(snap_info.clones, vec![id, clone]);
    assert_eq!(infos.iter().find(|i| i.id == clone).unwrap().allocated_clusters, 1);
    // The snapshot cannot go while blobs read through it.
    drop(snap_blob);
    let s = store.clone();
    let err = h.run(async move { s.delete_blob(snap).await }).unwrap_err();
    assert!(matches!(&err, BlobError::HasClones { clones, .. } if clones == &vec![id, clone]), "{err}");
    // Inflate both; then the snapshot can be deleted and the data stays.
    let s = store.clone();
    h.run(async move {
        s.inflate(id).await?;
        s.inflate(clone).await?;
        s.delete_blob(snap).await
    })
    .unwrap();
    assert_eq!(h.read(&ch, origin.shared(), 0, 48).unwrap(), expect);
    let mut clone_expect = v1.clone();
    clone_expect[40 * PAGE..41 * PAGE].fill(3);
    assert_eq!(h.read(&ch, clone_blob.shared(), 0, 48).unwrap(), clone_expect);
    let s = store.clone();
    let problems = h.run(async move { s.check().await }).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn decouple_copies_the_parent_and_links_the_grandparent() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    let id = h.run(async move { s.create_blob(opts(2, true)).await }).unwrap();
    let s = store.clone();
    let blob = h.run(async move { s.open_blob(id).await }).unwrap();
    let ch = h.channel(&store, 0);
    h.write(&ch, blob.shared(), 0, &[1; PAGE]).unwrap();
    let s = store.clone();
    let s1 = h.run(async move { s.snapshot(id, BTreeMap::new()).await }).unwrap();
    h.write(&ch, blob.shared(), 16, &[2; PAGE]).unwrap();
    let s = store.clone();
    let s2 = h.run(async move { s.snapshot(id, BTreeMap::new()).await }).unwrap();
    let s = store.clone();
    h.run(async move { s.decouple(id).await }).unwrap();
    let s = store.clone();
    let info = h.run(async move { s.info(id).await }).unwrap();
    assert_eq!(
        (info.parent, info.allocated_clusters),
        (Some(s1), 1),
        "cluster 1 came from s2; cluster 0 still from s1"
    );
    assert_eq!(h.read(&ch, blob.shared(), 0, 1).unwrap(), vec![1; PAGE]);
    assert_eq!(h.read(&ch, blob.shared(), 16, 1).unwrap(), vec![2; PAGE]);
    let s = store.clone();
    h.run(async move { s.delete_blob(s2).await }).unwrap();
    let s = store.clone();
    let problems = h.run(async move { s.check().await }).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn bad_operations_name_what_is_wrong() {
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    let id = h.run(async move { s.create_blob(opts(1, false)).await }).unwrap();
    let s = store.clone();
    let errs = h.run(async move {
        let mut out = Vec::new();
        out.push(s.open_blob(999).await.unwrap_err().to_string());
        out.push(s.set_xattr(id, "", b"x").await.unwrap_err().to_string());
        out.push(s.set_xattr(id, "big", &vec![0; 70_000]).await.unwrap_err().to_string());
        out.push(s.remove_xattr(id, "none").await.unwrap_err().to_string());
        out.push(s.clone_blob(id, BTreeMap::new()).await.unwrap_err().to_string());
        out.push(s.decouple(id).await.unwrap_err().to_string());
        let open = s.open_blob(id).await.unwrap();
        out.push(s.delete_blob(id).await.unwrap_err().to_string());
        open.close().await.unwrap();
        out.push(s.set_super(Some(12345)).await.unwrap_err().to_string());
        out
    });
    let expect = [
        "no blob 999",
        "xattr name \"\" must be 1 to 255 bytes",
        "70000 bytes for \"big\"",
        "blob 1 has no xattr \"none\"",
        "blob 1 is not a snapshot",
        "has no parent to decouple from",
        "blob 1 is open (1 handle(s))",
        "no blob 12345",
    ];
    for (got, want) in errs.iter().zip(expect) {
        assert!(got.contains(want), "{got:?} should contain {want:?}");
    }
}

#[test]
fn other_reactors_write_thin_blobs_through_the_home_reactor() {
    let (mut h, bdev) = Harness::with_malloc(2, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    let id = h.run(async move { s.create_blob(opts(8, true)).await }).unwrap();
    let s = store.clone();
    let blob = h.run(async move { s.open_blob(id).await }).unwrap();
    let ch1 = h.channel(&store, 1);
    let ch0 = h.channel(&store, 0);
    let data = pattern(3, 40 * PAGE);
    h.write(&ch1, blob.shared(), 8, &data).unwrap();
    assert_eq!(h.read(&ch0, blob.shared(), 8, 40).unwrap(), data);
    assert_eq!(h.read(&ch1, blob.shared(), 8, 40).unwrap(), data);
    let s = store.clone();
    assert_eq!(h.run(async move { s.info(id).await }).unwrap().allocated_clusters, 3);
}

#[test]
fn awaited_requests_from_any_thread_and_polled_requests_share_a_channel() {
    let (mut h, bdev) = Harness::with_malloc(2, 16, false);
    let store = h.format(&bdev, CLUSTER, None);
    let s = store.clone();
    let blob = h.run(async move { s.open_blob(s.create_blob(opts(8, true)).await?).await }).unwrap();
    // Awaited through reactor 1 (allocating a thin cluster on the way), read
    // back through reactor 0.
    let data = pattern(3, 2 * PAGE);
    let (r0, r1) = (h.reactors[0].handle(), h.reactors[1].handle());
    let (s, b, d) = (store.clone(), blob.shared().clone(), data.clone());
    let c =
        h.run(async move { s.io(&r1, BlobIo::write(&b, 20, pmd::DmaBuf::copy_from(&d).unwrap(), 9)).await }).unwrap();
    assert_eq!((c.tag, c.status), (9, Ok(())), "the completion carries the caller's tag");
    let (s, b, r) = (store.clone(), blob.shared().clone(), r0.clone());
    let c = h.run(async move { s.io(&r, BlobIo::read(&b, 20, pmd::DmaBuf::new(2 * PAGE).unwrap(), 0)).await }).unwrap();
    let mut got = vec![0; 2 * PAGE];
    c.bufs.copy_out(0, &mut got);
    assert_eq!(got, data);
    // A polled request in flight on reactor 0's channel while a task awaits
    // another there: each sees only its own completion.
    let ch = h.channel(&store, 0);
    ch.submit(h.now, BlobIo::read(blob.shared(), 20, pmd::DmaBuf::new(PAGE).unwrap(), 77));
    let (s, b) = (store.clone(), blob.shared().clone());
    let awaited = h.run(async move { s.io(&r0, BlobIo::read(&b, 21, pmd::DmaBuf::new(PAGE).unwrap(), 5)).await });
    assert_eq!(awaited.unwrap().tag, 5);
    let mut out = Vec::new();
    while out.is_empty() {
        h.step();
        ch.poll(h.now, &mut out);
    }
    assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), [77]);
    // The top bit of a tag is the channel's own: a user's request with it fails.
    let c = h.io(&ch, BlobIo::read(blob.shared(), 0, pmd::DmaBuf::new(PAGE).unwrap(), 1 << 63));
    assert_eq!(c.status, Err(IoError::Invalid));
}

#[test]
fn the_state_is_whole_while_a_checkpoint_commits() {
    // A 32-page journal passes half full every few records, so checkpoints
    // run behind the commands. Checks in a row after each command land at
    // every point of one, including while its super block is being written.
    let (mut h, bdev) = Harness::with_malloc(1, 16, false);
    let store = h.format(&bdev, CLUSTER, Some(32));
    let s = store.clone();
    let id = h.run(async move { s.create_blob(opts(1, false)).await }).unwrap();
    for i in 0..100u32 {
        let s = store.clone();
        h.run(async move {
            s.set_xattr(id, "n", &i.to_le_bytes()).await?;
            s.sync_blob(id).await
        })
        .unwrap();
        for _ in 0..10 {
            let s = store.clone();
            let problems = h.run(async move { s.check().await }).unwrap();
            assert!(problems.is_empty(), "after command {i}: {problems:?}");
        }
    }
    let s = store.clone();
    let stats = h.run(async move { s.stats().await }).unwrap();
    assert!(stats.ops.checkpoints >= 5, "checkpoints ran behind: {:?}", stats.ops);
}
