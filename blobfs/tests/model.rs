//! Property test: random sequences of blob operations against an in-memory
//! model. Without crashes the model is exact: every page has one right value,
//! every blob one right size, parent and set of xattrs.

mod common;

use std::collections::BTreeMap;

use blobfs::{BlobError, BlobOptions, Blobstore};
use common::{Harness, PAGE};
use proptest::prelude::*;

const CLUSTER: u32 = 16 * 1024;
const PPC: usize = CLUSTER as usize / PAGE;

#[derive(Clone, Debug)]
struct MBlob {
    pages: Vec<u8>,
    snapshot: bool,
    parent: Option<u64>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Default)]
struct Model {
    blobs: BTreeMap<u64, MBlob>,
    next_id: u64,
}

/// One step of the workload, decoded from raw numbers so that proptest shrinks it well.
fn step(
    h: &mut Harness,
    store: &Blobstore,
    m: &mut Model,
    (kind, a, b, c): (u8, u8, u8, u8),
) -> Result<(), TestCaseError> {
    let ids: Vec<u64> = m.blobs.keys().copied().collect();
    let pick = |x: u8| ids.get(x as usize % ids.len().max(1)).copied();
    let s = store.clone();
    match kind % 9 {
        0 => {
            let (size, thin) = (a as u64 % 4, b % 2 == 0);
            let id =
                h.run(
                    async move { s.create_blob(BlobOptions { num_clusters: size, thin, ..Default::default() }).await },
                );
            m.next_id += 1;
            prop_assert_eq!(id.unwrap(), m.next_id);
            m.blobs.insert(
                m.next_id,
                MBlob { pages: vec![0; size as usize * PPC], snapshot: false, parent: None, xattrs: BTreeMap::new() },
            );
        }
        1 | 2 => {
            let Some(id) = pick(a) else { return Ok(()) };
            let mb = &m.blobs[&id];
            if mb.pages.is_empty() {
                return Ok(());
            }
            let page = b as usize % mb.pages.len();
            let n = (c as usize % 6 + 1).min(mb.pages.len() - page);
            let ch = h.channel(store, 0);
            let blob = h.run(async move { s.open_blob(id).await }).unwrap();
            let data: Vec<u8> = (0..n).flat_map(|i| vec![c.wrapping_add(i as u8) | 1; PAGE]).collect();
            let r = h.write(&ch, blob.shared(), page as u64, &data);
            if mb.snapshot {
                prop_assert_eq!(r, Err(nvme::IoError::ReadOnly));
            } else {
                r.unwrap();
                let mb = m.blobs.get_mut(&id).unwrap();
                for i in 0..n {
                    mb.pages[page + i] = c.wrapping_add(i as u8) | 1;
                }
            }
        }
        3 => {
            let Some(id) = pick(a) else { return Ok(()) };
            let n = b as u64 % 5;
            let r = h.run(async move { s.resize_blob(id, n).await });
            // Grown clusters of a clone are unallocated: they read the parent's data.
            let parent_pages = m.blobs[&id].parent.map(|p| m.blobs[&p].pages.clone()).unwrap_or_default();
            let mb = m.blobs.get_mut(&id).unwrap();
            if mb.snapshot {
                prop_assert!(matches!(r, Err(BlobError::ReadOnly(_))));
            } else {
                r.unwrap();
                let old = mb.pages.len();
                mb.pages.resize(n as usize * PPC, 0);
                for i in old..mb.pages.len() {
                    mb.pages[i] = parent_pages.get(i).copied().unwrap_or(0);
                }
            }
        }
        4 => {
            let Some(id) = pick(a) else { return Ok(()) };
            let r = h.run(async move { s.snapshot(id, BTreeMap::new()).await });
            let mb = m.blobs[&id].clone();
            if mb.snapshot {
                prop_assert!(r.is_err());
            } else {
                m.next_id += 1;
                prop_assert_eq!(r.unwrap(), m.next_id);
                m.blobs.insert(m.next_id, MBlob { snapshot: true, xattrs: BTreeMap::new(), ..mb });
                m.blobs.get_mut(&id).unwrap().parent = Some(m.next_id);
            }
        }
        5 => {
            let Some(id) = pick(a) else { return Ok(()) };
            let r = h.run(async move { s.clone_blob(id, BTreeMap::new()).await });
            let mb = m.blobs[&id].clone();
            if mb.snapshot {
                m.next_id += 1;
                prop_assert_eq!(r.unwrap(), m.next_id);
                m.blobs.insert(m.next_id, MBlob { snapshot: false, parent: Some(id), xattrs: BTreeMap::new(), ..mb });
            } else {
                prop_assert!(matches!(r, Err(BlobError::NotSnapshot(_))));
            }
        }
        6 => {
            let Some(id) = pick(a) else { return Ok(()) };
            let r = h.run(async move { s.delete_blob(id).await });
            if m.blobs.values().any(|x| x.parent == Some(id)) {
                prop_assert!(matches!(r, Err(BlobError::HasClones { .. })), "expected HasClones, got {:?}", r);
            } else {
                r.unwrap();
                m.blobs.remove(&id);
            }
        }
        7 => {
            let Some(id) = pick(a) else { return Ok(()) };
            let (key, value) = (format!("x{}", b % 3), vec![c; c as usize % 50]);
            let (k, v) = (key.clone(), value.clone());
            let r = h.run(async move {
                s.set_xattr(id, &k, &v).await?;
                s.sync_blob(id).await
            });
            let mb = m.blobs.get_mut(&id).unwrap();
            if mb.snapshot {
                prop_assert!(matches!(r, Err(BlobError::ReadOnly(_))));
            } else {
                r.unwrap();
                mb.xattrs.insert(key, value);
            }
        }
        _ => {
            let Some(id) = pick(a) else { return Ok(()) };
            let decouple = b % 2 == 0;
            let r = h.run(async move { if decouple { s.decouple(id).await } else { s.inflate(id).await } });
            let mb = m.blobs[&id].clone();
            match (mb.snapshot, decouple, mb.parent) {
                (true, _, _) => prop_assert!(r.is_err()),
                (false, true, None) => prop_assert!(r.is_err()),
                (false, true, Some(p)) => {
                    r.unwrap();
                    m.blobs.get_mut(&id).unwrap().parent = m.blobs[&p].parent;
                }
                (false, false, _) => {
                    r.unwrap();
                    m.blobs.get_mut(&id).unwrap().parent = None;
                }
            }
        }
    }
    Ok(())
}

fn verify(h: &mut Harness, store: &Blobstore, m: &Model) -> Result<(), TestCaseError> {
    let s = store.clone();
    let infos = h.run(async move { s.list().await }).unwrap();
    prop_assert_eq!(infos.iter().map(|i| i.id).collect::<Vec<_>>(), m.blobs.keys().copied().collect::<Vec<_>>());
    let ch = h.channel(store, 0);
    for info in infos {
        let mb = &m.blobs[&info.id];
        prop_assert_eq!(info.num_clusters as usize * PPC, mb.pages.len());
        prop_assert_eq!((info.snapshot, info.parent), (mb.snapshot, mb.parent));
        let s = store.clone();
        let id = info.id;
        let (x, blob) =
            h.run(async move { Ok::<_, BlobError>((s.xattrs(id).await?, s.open_blob(id).await?)) }).unwrap();
        prop_assert_eq!(&x, &mb.xattrs);
        if !mb.pages.is_empty() {
            let data = h.read(&ch, blob.shared(), 0, mb.pages.len()).unwrap();
            for (p, &v) in mb.pages.iter().enumerate() {
                prop_assert!(
                    data[p * PAGE..(p + 1) * PAGE].iter().all(|&x| x == v),
                    "blob {} page {} should hold {}",
                    id,
                    p,
                    v
                );
            }
        }
    }
    let s = store.clone();
    let problems = h.run(async move { s.check().await }).unwrap();
    prop_assert!(problems.is_empty(), "{:?}", problems);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn blob_operations_match_the_model(steps in proptest::collection::vec(any::<(u8, u8, u8, u8)>(), 1..60)) {
        let (mut h, bdev) = Harness::with_malloc(1, 8, false);
        let store = h.format(&bdev, CLUSTER, Some(32));
        let mut m = Model::default();
        for s in steps {
            step(&mut h, &store, &mut m, s)?;
        }
        verify(&mut h, &store, &m)?;
        // And the same after a clean unload and load.
        let s = store.clone();
        h.run(async move { s.unload().await }).unwrap();
        let (store, _) = h.load(&bdev).unwrap();
        verify(&mut h, &store, &m)?;
    }
}
