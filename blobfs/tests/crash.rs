//! Crash tests: a random workload on a crash bdev, a power cut at a random
//! moment (possibly in the middle of an operation), a reload, and a check of
//! everything against a model of what may survive.
//!
//! Per blob, the model keeps the metadata as of the last completed operation;
//! the operation in flight at the cut may have happened or not. Per page, it
//! keeps every value written and which one was last flushed: after the cut the
//! page must hold the flushed value or a later one. The store's own check must
//! find every cluster owned once and nothing leaked.
//!
//! `BLOBFS_CRASH_ITERATIONS` sets the number of cuts per test (the four tests
//! together run 1,000 by default; e.g. 25000 each for the 100,000 long mode),
//! `BLOBFS_CRASH_SEED` replays one failing seed.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use blobfs::{BlobChannel, BlobError, BlobInfo, BlobIo, BlobOptions, BlobShared, Blobstore};
use common::{Harness, PAGE};
use nvme::crash::{self, PowerCutConfig, PowerCutMode, PowerState};
use pmd::DmaBuf;

const CLUSTER: u32 = 16 * 1024;
const PPC: u64 = (CLUSTER as u64) / PAGE as u64;

#[derive(Clone, Debug, PartialEq)]
struct Md {
    size: u64,
    thin: bool,
    snapshot: bool,
    parent: Option<u64>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Clone, Debug)]
struct Page {
    /// Seeds of the values written, in order; 0 is zeros.
    values: Vec<u64>,
    /// Index of the value last flushed.
    flushed: usize,
    /// Values of a page dropped by a shrink and grown back: they remain possible
    /// until the blob's new size is synced (the old cluster is still durable).
    ghost: Vec<u64>,
}

impl Page {
    fn zeros() -> Self {
        Page { values: vec![0], flushed: 0, ghost: Vec::new() }
    }
    fn allowed(&self) -> Vec<u64> {
        self.values[self.flushed..].iter().chain(&self.ghost).copied().collect()
    }
}

#[derive(Clone, Debug)]
struct Blob {
    /// What may be durable: the last synced metadata, and the live metadata of
    /// moments when a first write to a thin blob journaled it (an allocation
    /// carries the blob's pending changes when its durable size lacks the cluster).
    durable: Vec<Md>,
    live: Md,
    pages: Vec<Page>,
}

#[derive(Clone, Debug)]
enum Op {
    Create { thin: bool, size: u64, name: String },
    Write { blob: u64, page: u64, seeds: Vec<u64> },
    Flush,
    SetXattr { blob: u64, key: String, value: Vec<u8> },
    Sync { blob: u64 },
    Resize { blob: u64, size: u64 },
    Snapshot { blob: u64 },
    Clone { snapshot: u64 },
    Delete { blob: u64 },
    Inflate { blob: u64 },
}

#[derive(Clone, Default, Debug)]
struct Model {
    blobs: BTreeMap<u64, Blob>,
    next_id: u64,
    next_seed: u64,
}

impl Model {
    fn writable(&self) -> Vec<u64> {
        self.blobs.iter().filter(|(_, b)| !b.live.snapshot).map(|(&id, _)| id).collect()
    }

    fn has_clones(&self, id: u64) -> bool {
        self.blobs.values().any(|b| b.live.parent == Some(id))
    }

    fn pick(&mut self, rng: &mut fastrand::Rng) -> Op {
        let writable = self.writable();
        let snapshots: Vec<u64> = self.blobs.iter().filter(|(_, b)| b.live.snapshot).map(|(&id, _)| id).collect();
        loop {
            let op = match rng.u32(0..100) {
                _ if self.blobs.len() < 2 => None,
                0..=29 if !writable.is_empty() => {
                    let blob = writable[rng.usize(..writable.len())];
                    let pages = self.blobs[&blob].live.size * PPC;
                    (pages > 0).then(|| {
                        let page = rng.u64(0..pages);
                        let n = rng.u64(1..=(pages - page).min(PPC + 2));
                        let seeds = (0..n)
                            .map(|_| {
                                self.next_seed += 1;
                                self.next_seed
                            })
                            .collect();
                        Op::Write { blob, page, seeds }
                    })
                }
                30..=39 => Some(Op::Flush),
                40..=49 if !writable.is_empty() => {
                    let blob = writable[rng.usize(..writable.len())];
                    Some(Op::SetXattr {
                        blob,
                        key: format!("k{}", rng.u8(0..4)),
                        value: vec![rng.u8(..); rng.usize(0..40)],
                    })
                }
                50..=59 if !writable.is_empty() => Some(Op::Sync { blob: writable[rng.usize(..writable.len())] }),
                60..=66 if !writable.is_empty() => {
                    Some(Op::Resize { blob: writable[rng.usize(..writable.len())], size: rng.u64(0..6) })
                }
                67..=71 if !writable.is_empty() && snapshots.len() < 4 => {
                    Some(Op::Snapshot { blob: writable[rng.usize(..writable.len())] })
                }
                72..=75 if !snapshots.is_empty() => {
                    Some(Op::Clone { snapshot: snapshots[rng.usize(..snapshots.len())] })
                }
                76..=82 => {
                    let ids: Vec<u64> = self.blobs.keys().copied().filter(|&id| !self.has_clones(id)).collect();
                    (!ids.is_empty()).then(|| Op::Delete { blob: ids[rng.usize(..ids.len())] })
                }
                83..=85 if !writable.is_empty() => Some(Op::Inflate { blob: writable[rng.usize(..writable.len())] }),
                _ => None,
            };
            if let Some(op) = op {
                return op;
            }
            if self.blobs.len() < 6 {
                return Op::Create { thin: rng.bool(), size: rng.u64(1..5), name: format!("b{}", self.next_id + 1) };
            }
        }
    }

    /// The model after `op` completes.
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Create { thin, size, name } => {
                self.next_id += 1;
                let md = Md {
                    size: *size,
                    thin: *thin,
                    snapshot: false,
                    parent: None,
                    xattrs: [("name".into(), name.clone().into_bytes())].into(),
                };
                self.blobs.insert(
                    self.next_id,
                    Blob { durable: vec![md.clone()], live: md, pages: vec![Page::zeros(); (*size * PPC) as usize] },
                );
            }
            Op::Write { blob, page, seeds } => {
                let b = self.blobs.get_mut(blob).unwrap();
                for (i, s) in seeds.iter().enumerate() {
                    b.pages[(*page as usize) + i].values.push(*s);
                }
                if b.live.thin && !b.durable.contains(&b.live) {
                    b.durable.push(b.live.clone());
                }
            }
            Op::Flush => {
                for b in self.blobs.values_mut() {
                    for p in &mut b.pages {
                        p.flushed = p.values.len() - 1;
                    }
                }
            }
            Op::SetXattr { blob, key, value } => {
                self.blobs.get_mut(blob).unwrap().live.xattrs.insert(key.clone(), value.clone());
            }
            Op::Sync { blob } => {
                let b = self.blobs.get_mut(blob).unwrap();
                b.durable = vec![b.live.clone()];
                b.pages.iter_mut().for_each(|p| p.ghost.clear());
            }
            Op::Resize { blob, size } => {
                // A grown page reads what the parent (a snapshot, immutable) has there, or zeros.
                let parent_pages =
                    self.blobs[blob].live.parent.map(|p| self.blobs[&p].pages.clone()).unwrap_or_default();
                let b = self.blobs.get_mut(blob).unwrap();
                let (old, new) = ((b.live.size * PPC) as usize, (*size * PPC) as usize);
                b.live.size = *size;
                for i in old.min(new)..new {
                    let fresh = parent_pages
                        .get(i)
                        .map(|p| Page { ghost: Vec::new(), ..p.clone() })
                        .unwrap_or_else(Page::zeros);
                    match b.pages.get_mut(i) {
                        Some(p) => {
                            let mut ghost = p.allowed();
                            ghost.append(&mut p.ghost);
                            *p = Page { ghost, ..fresh };
                        }
                        None => b.pages.push(fresh),
                    }
                }
            }
            Op::Snapshot { blob } => {
                self.next_id += 1;
                let b = self.blobs.get_mut(blob).unwrap();
                let snap_md = Md { snapshot: true, xattrs: BTreeMap::new(), ..b.live.clone() };
                let snap = Blob {
                    durable: vec![snap_md.clone()],
                    live: snap_md,
                    pages: b.pages[..(b.live.size * PPC) as usize].to_vec(),
                };
                b.live.parent = Some(self.next_id);
                b.live.thin = true;
                b.durable = vec![b.live.clone()];
                b.pages.iter_mut().for_each(|p| p.ghost.clear());
                self.blobs.insert(self.next_id, snap);
            }
            Op::Clone { snapshot } => {
                self.next_id += 1;
                let s = &self.blobs[snapshot];
                let md = Md {
                    size: s.live.size,
                    thin: true,
                    snapshot: false,
                    parent: Some(*snapshot),
                    xattrs: BTreeMap::new(),
                };
                let clone = Blob { durable: vec![md.clone()], live: md, pages: s.pages.clone() };
                self.blobs.insert(self.next_id, clone);
            }
            Op::Delete { blob } => {
                self.blobs.remove(blob);
            }
            Op::Inflate { blob } => {
                let b = self.blobs.get_mut(blob).unwrap();
                b.live.parent = None;
                b.live.thin = false;
                b.durable = vec![b.live.clone()];
                b.pages.iter_mut().for_each(|p| p.ghost.clear());
            }
        }
    }
}

type OpFuture = Pin<Box<dyn Future<Output = Result<(), String>>>>;

/// Starts `op` against the store (data ops through `ch` on reactor 0).
fn start(op: &Op, store: &Blobstore, ch: &Rc<BlobChannel>, handles: &BTreeMap<u64, Arc<BlobShared>>) -> OpFuture {
    let s = store.clone();
    let e = |r: Result<(), BlobError>| r.map_err(|e| e.to_string());
    match op.clone() {
        Op::Create { thin, size, name } => Box::pin(async move {
            let xattrs = [("name".to_string(), name)].into();
            s.create_blob(BlobOptions { num_clusters: size, thin, xattrs, ..Default::default() })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
        Op::Write { blob, page, seeds } => {
            let mut data = Vec::with_capacity(seeds.len() * PAGE);
            for seed in &seeds {
                data.extend(std::iter::repeat_n(seed.to_le_bytes(), PAGE / 8).flatten());
            }
            data_op(ch, BlobIo::write(&handles[&blob], page, DmaBuf::copy_from(&data).unwrap(), 0))
        }
        Op::Flush => match handles.values().next() {
            Some(any) => data_op(ch, BlobIo::flush(any, 0)),
            None => Box::pin(async { Ok(()) }),
        },
        Op::SetXattr { blob, key, value } => Box::pin(async move { e(s.set_xattr(blob, &key, &value).await) }),
        Op::Sync { blob } => Box::pin(async move { e(s.sync_blob(blob).await) }),
        Op::Resize { blob, size } => Box::pin(async move { e(s.resize_blob(blob, size).await) }),
        Op::Snapshot { blob } => {
            Box::pin(async move { s.snapshot(blob, BTreeMap::new()).await.map(|_| ()).map_err(|e| e.to_string()) })
        }
        Op::Clone { snapshot } => {
            Box::pin(
                async move { s.clone_blob(snapshot, BTreeMap::new()).await.map(|_| ()).map_err(|e| e.to_string()) },
            )
        }
        Op::Delete { blob } => Box::pin(async move { e(s.delete_blob(blob).await) }),
        Op::Inflate { blob } => Box::pin(async move { e(s.inflate(blob).await) }),
    }
}

fn data_op(ch: &Rc<BlobChannel>, io: BlobIo) -> OpFuture {
    let ch = ch.clone();
    let mut io = Some(io);
    let mut out = Vec::new();
    Box::pin(std::future::poll_fn(move |_| {
        if let Some(io) = io.take() {
            ch.submit(pmd::clock::now(), io);
        }
        if ch.poll(pmd::clock::now(), &mut out) > 0 {
            let c = out.pop().unwrap();
            return Poll::Ready(c.status.map_err(|e| format!("{:?}: {e}", c.op)));
        }
        Poll::Pending
    }))
}

fn md_of(info: &BlobInfo, xattrs: BTreeMap<String, Vec<u8>>) -> Md {
    Md { size: info.num_clusters, thin: info.thin, snapshot: info.snapshot, parent: info.parent, xattrs }
}

/// One iteration: a workload of `ops` operations cut at a random point.
fn iteration(seed: u64, ops: usize) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut h, bdev) = Harness::with_malloc(1, 4, true);
    let store = h.format(&bdev, CLUSTER, Some(32));
    let ch = Rc::new(h.channel(&store, 0));
    let mut model = Model::default();
    let mut handles: BTreeMap<u64, Arc<BlobShared>> = BTreeMap::new();
    let cut_at = rng.usize(0..ops);
    let mut in_flight = None;
    let trace = std::env::var_os("BLOBFS_CRASH_TRACE").is_some();
    for k in 0..ops {
        let op = model.pick(&mut rng);
        if trace {
            eprintln!("op {k}{}: {op:?}", if k == cut_at { " (cut)" } else { "" });
        }
        // Data ops need each writable blob's shared view (the handle itself is
        // closed again at once, so that deletes find the blob closed).
        for id in model.writable() {
            if let std::collections::btree_map::Entry::Vacant(slot) = handles.entry(id) {
                let s = store.clone();
                let blob = h.run(async move { s.open_blob(id).await }).map_err(|e| format!("open {id}: {e}"))?;
                slot.insert(blob.shared().clone());
                drop(blob);
                h.step();
            }
        }
        if let Op::Delete { blob } = &op {
            handles.remove(blob);
        }
        let mut fut = start(&op, &store, &ch, &handles);
        if k == cut_at {
            let rounds = rng.u32(0..300);
            let mut done = None;
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            for _ in 0..rounds {
                if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                    done = Some(r);
                    break;
                }
                h.step();
            }
            match done {
                Some(Ok(())) => model.apply(&op),
                Some(Err(e)) => return Err(format!("op {k} {op:?} failed before the cut: {e}")),
                None => in_flight = Some(op.clone()),
            }
            break;
        }
        h.run(fut).map_err(|e| format!("op {k} {op:?} failed: {e}"))?;
        model.apply(&op);
    }
    // The cut: unflushed writes are kept, torn or lost at random.
    let mode = [PowerCutMode::Drop, PowerCutMode::Keep, PowerCutMode::Random][rng.usize(0..3)];
    crash::power_cut(&h.registry, &PowerCutConfig { name: "C0".into(), mode, seed }).unwrap();
    while crash::status(&h.registry, "C0").unwrap().state != PowerState::Off {
        h.step();
    }
    let s = store.clone();
    h.run(async move { s.abandon().await });
    drop((ch, handles, store));
    for _ in 0..200 {
        h.step();
    }
    crash::power_on(&h.registry, "C0").unwrap();
    let (store, _report) = h.load(&bdev).map_err(|e| format!("reload after the cut failed: {e}"))?;

    // What may exist: the model, and the model with the operation in flight done.
    let mut after = model.clone();
    if let Some(op) = &in_flight {
        after.apply(op);
    }
    let s = store.clone();
    let actual = h
        .run(async move {
            let mut out = BTreeMap::new();
            for info in s.list().await? {
                let x = s.xattrs(info.id).await?;
                out.insert(info.id, (info, x));
            }
            Ok::<_, BlobError>(out)
        })
        .map_err(|e| format!("listing after reload: {e}"))?;
    let mut ids: Vec<u64> = model.blobs.keys().chain(after.blobs.keys()).chain(actual.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let ch = h.channel(&store, 0);
    for id in ids {
        let candidates: Vec<&Blob> = [model.blobs.get(&id), after.blobs.get(&id)].into_iter().flatten().collect();
        let may_vanish = !model.blobs.contains_key(&id) || !after.blobs.contains_key(&id);
        let Some((info, xattrs)) = actual.get(&id) else {
            if may_vanish {
                continue;
            }
            return Err(format!("blob {id} vanished (in flight: {in_flight:?})"));
        };
        let md = md_of(info, xattrs.clone());
        let Some(b) = candidates.iter().find(|b| b.durable.contains(&md) || b.live == md && in_flight.is_some()) else {
            let expected: Vec<&Md> = candidates.iter().flat_map(|b| &b.durable).collect();
            return Err(format!("blob {id}: metadata {md:?}, expected one of {expected:?} (in flight: {in_flight:?})"));
        };
        let s = store.clone();
        let blob = h.run(async move { s.open_blob(id).await }).map_err(|e| e.to_string())?;
        let pages = info.num_clusters * PPC;
        if pages > 0 {
            let data =
                h.read(&ch, blob.shared(), 0, pages as usize).map_err(|e| format!("blob {id}: read failed: {e}"))?;
            for p in 0..pages as usize {
                let page = &data[p * PAGE..(p + 1) * PAGE];
                let seed = u64::from_le_bytes(page[..8].try_into().unwrap());
                if page.chunks(8).any(|w| w != seed.to_le_bytes()) {
                    return Err(format!("blob {id} page {p}: torn within the page"));
                }
                let allowed: Vec<u64> =
                    candidates.iter().filter_map(|c| c.pages.get(p)).flat_map(|pg| pg.allowed()).collect();
                if !(allowed.contains(&seed) || b.pages.get(p).is_none() && seed == 0) {
                    return Err(format!(
                        "blob {id} page {p}: holds value {seed}, allowed {allowed:?} (in flight: {in_flight:?})"
                    ));
                }
            }
        }
        drop(blob);
    }
    let s = store.clone();
    let problems = h.run(async move { s.check().await }).map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!("check found: {problems:?}"));
    }
    Ok(())
}

fn iterations(base: u64) {
    let n: u64 = std::env::var("BLOBFS_CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(250);
    let seeds: Vec<u64> = match std::env::var("BLOBFS_CRASH_SEED").ok().and_then(|v| v.parse().ok()) {
        Some(s) => vec![s],
        None => (0..n).map(|i| base * 1_000_000 + i).collect(),
    };
    for seed in seeds {
        if let Err(e) = iteration(seed, 40) {
            panic!("crash iteration failed (reproduce with BLOBFS_CRASH_SEED={seed}): {e}");
        }
    }
}

#[test]
fn power_cuts_at_random_points_1() {
    iterations(1);
}

#[test]
fn power_cuts_at_random_points_2() {
    iterations(2);
}

#[test]
fn power_cuts_at_random_points_3() {
    iterations(3);
}

#[test]
fn power_cuts_at_random_points_4() {
    iterations(4);
}
