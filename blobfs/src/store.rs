//! The public handle of a store, usable from any thread: metadata operations
//! are async and run as tasks on the store's home reactor; data I/O goes
//! through a [`BlobChannel`] on the calling reactor.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use nvme::{BdevRegistry, Claim};
use pmd::{Ctx, IoChannel, ReactorHandle};

use crate::channel::{BlobCompletion, BlobIo, BsChannel};
use crate::engine::ops::{BlobInfo, BlobOptions};
use crate::engine::{CheckReport, Engine, FormatOptions, LoadReport, OpStats, geometry_for, home_io};
use crate::error::BlobError;
use crate::format::{PAGE_SIZE, SuperBlock, decode_page};
use crate::shared::{BlobShared, StoreShared};

/// Where the engine of a store lives on its home reactor (filled once it is up).
#[derive(Default)]
pub(crate) struct EngineSlot(pub RefCell<Option<Rc<Engine>>>);

/// A loaded blobstore. Cheap to clone; every clone refers to the same store.
#[derive(Clone)]
pub struct Blobstore {
    shared: Arc<StoreShared>,
    claim: Arc<Mutex<Option<Claim>>>,
}

impl std::fmt::Debug for Blobstore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobstore").field("bdev", &self.bdev_name()).field("geometry", &self.shared.geometry).finish()
    }
}

/// Statistics of a store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreStats {
    /// The bdev holding the store.
    pub bdev: String,
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// Clusters in all.
    pub total_clusters: u64,
    /// Clusters free now.
    pub free_clusters: u64,
    /// Clusters of the super blocks and journal.
    pub md_clusters: u64,
    /// Journal pages.
    pub journal_pages: u64,
    /// Journal pages holding records not yet in a checkpoint.
    pub journal_used_pages: u64,
    /// Blobs.
    pub blobs: u64,
    /// The super blob.
    pub super_blob: Option<u64>,
    /// The current checkpoint's generation.
    pub checkpoint: u64,
    /// Metadata work done since load.
    pub ops: OpStats,
}

impl Blobstore {
    /// Opens and claims `bdev` for a store of `geometry` (from the format
    /// options, or read from the store's super block).
    fn start(
        registry: &BdevRegistry,
        bdev: &str,
        home: ReactorHandle,
        geometry: impl FnOnce(&nvme::BdevDesc) -> Result<crate::format::Geometry, BlobError>,
    ) -> Result<(Arc<StoreShared>, Claim), BlobError> {
        let desc = registry.open(bdev, true)?;
        let geometry = geometry(&desc)?;
        let claim = desc.bdev().claim("blobstore")?;
        Ok((StoreShared::new(desc, geometry, home), claim))
    }

    /// Formats `bdev` as a new, empty store, with `home` as its metadata reactor.
    pub async fn format(
        registry: &BdevRegistry,
        bdev: &str,
        home: ReactorHandle,
        opts: FormatOptions,
    ) -> Result<Blobstore, BlobError> {
        let (shared, claim) = Self::start(registry, bdev, home, |desc| geometry_for(desc, &opts))?;
        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let s = shared.clone();
        let up = shared.home.spawn(move |ctx| {
            let setup = install(&s, ctx);
            async move {
                let (slot, io) = setup?;
                let engine = Engine::format(s, io, uuid).await?;
                run(&slot, &engine);
                Ok::<_, BlobError>(())
            }
        });
        up.await.map_err(|_| BlobError::HomeGone)??;
        tracing::info!(bdev, "blobstore formatted");
        Ok(Blobstore { shared, claim: Arc::new(Mutex::new(Some(claim))) })
    }

    /// Loads the store on `bdev`, replaying its journal if it was not unloaded cleanly.
    pub async fn load(
        registry: &BdevRegistry,
        bdev: &str,
        home: ReactorHandle,
    ) -> Result<(Blobstore, LoadReport), BlobError> {
        let geometry = read_geometry(registry, bdev, &home).await?;
        let (shared, claim) = Self::start(registry, bdev, home, |_| Ok(geometry))?;
        let s = shared.clone();
        let name = bdev.to_string();
        let up = shared.home.spawn(move |ctx| {
            let setup = install(&s, ctx);
            async move {
                let (slot, io) = setup?;
                let (engine, report) = Engine::load(s, io, &name, false).await?;
                run(&slot, &engine);
                Ok::<_, BlobError>(report)
            }
        });
        let report = up.await.map_err(|_| BlobError::HomeGone)??;
        tracing::info!(
            bdev,
            clean = report.clean,
            replayed = report.replayed_records,
            blobs = report.blobs,
            "blobstore loaded"
        );
        Ok((Blobstore { shared, claim: Arc::new(Mutex::new(Some(claim))) }, report))
    }

    /// Verifies the store on `bdev` without loading it for use (nothing is
    /// written): every metadata page readable and checking, every cluster
    /// owned once, nothing leaked. The store must not be loaded.
    pub async fn check_offline(
        registry: &BdevRegistry,
        bdev: &str,
        home: ReactorHandle,
    ) -> Result<CheckReport, BlobError> {
        let b = registry.get(bdev)?;
        if let Some(by) = b.claimed_by() {
            return Err(BlobError::invalid("bdev", format!("{bdev} is claimed by {by}; unload the blobstore first")));
        }
        let failed = |problem: String| CheckReport {
            consistent: false,
            problems: vec![problem],
            load: None,
            used_clusters: 0,
            total_clusters: 0,
        };
        let geometry = match read_geometry(registry, bdev, &home).await {
            Ok(g) => g,
            Err(e @ (BlobError::NotABlobstore { .. } | BlobError::Corrupt { .. })) => return Ok(failed(e.to_string())),
            Err(e) => return Err(e),
        };
        let desc = registry.open(bdev, false)?;
        let shared = StoreShared::new(desc, geometry, home);
        let name = bdev.to_string();
        let rx = shared.home.clone().spawn(move |ctx| {
            let io = home_io(&shared, ctx);
            async move {
                let io = io?;
                match Engine::load(shared, io, &name, true).await {
                    Ok((engine, report)) => {
                        let problems = engine.check();
                        Ok(CheckReport {
                            consistent: problems.is_empty(),
                            problems,
                            load: Some(report),
                            used_clusters: engine.used_clusters(),
                            total_clusters: engine.store.geometry.num_clusters,
                        })
                    }
                    Err(e @ (BlobError::NotABlobstore { .. } | BlobError::Corrupt { .. })) => Ok(failed(e.to_string())),
                    Err(e) => Err(e),
                }
            }
        });
        rx.await.map_err(|_| BlobError::HomeGone)?
    }

    /// Clusters free now (a moment's figure: other users allocate too).
    pub fn free_clusters(&self) -> u64 {
        self.shared.free_clusters.load(Ordering::Relaxed)
    }

    /// The store's home reactor (where its metadata lives).
    pub fn home(&self) -> &ReactorHandle {
        &self.shared.home
    }

    /// The bdev holding the store.
    pub fn bdev_name(&self) -> String {
        self.shared.desc.bdev().name().to_string()
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u32 {
        self.shared.geometry.cluster_size
    }

    /// Pages (4 KiB) per cluster.
    pub fn pages_per_cluster(&self) -> u64 {
        self.shared.geometry.pages_per_cluster()
    }

    /// Runs `f` with the engine on the home reactor.
    async fn on_home<T, Fut>(&self, f: impl FnOnce(Rc<Engine>) -> Fut + Send + 'static) -> Result<T, BlobError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, BlobError>> + 'static,
    {
        if self.shared.unloaded.load(Ordering::Acquire) {
            return Err(BlobError::Unloaded);
        }
        let key = self.shared.key;
        let rx = self.shared.home.spawn(move |ctx| {
            let engine = Engine::lookup_slot(ctx, key);
            async move {
                match engine {
                    Some(e) => f(e).await,
                    None => Err(BlobError::Unloaded),
                }
            }
        });
        rx.await.map_err(|_| BlobError::HomeGone)?
    }

    /// Writes a clean checkpoint and gives the bdev back. Refused while blobs are open.
    pub async fn unload(&self) -> Result<(), BlobError> {
        self.on_home(move |e| async move {
            e.unload().await?;
            e.uninstall();
            Ok(())
        })
        .await?;
        self.shared.unloaded.store(true, Ordering::Release);
        self.claim.lock().unwrap_or_else(|p| p.into_inner()).take();
        tracing::info!(bdev = self.bdev_name(), "blobstore unloaded");
        Ok(())
    }

    /// Stops the store without writing anything (what a crash leaves), for tests
    /// and for giving up on a device that fails.
    pub async fn abandon(&self) {
        let _ = self
            .on_home(move |e| async move {
                e.abandon().await;
                e.uninstall();
                Ok(())
            })
            .await;
        self.shared.unloaded.store(true, Ordering::Release);
        self.claim.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Creates a blob; returns its id.
    pub async fn create_blob(&self, opts: BlobOptions) -> Result<u64, BlobError> {
        self.on_home(move |e| async move { e.create_blob(opts).await }).await
    }

    /// Opens a blob for I/O. Close it with [`Blob::close`].
    pub async fn open_blob(&self, id: u64) -> Result<Blob, BlobError> {
        let shared = self.on_home(move |e| async move { e.open_blob(id) }).await?;
        Ok(Blob { shared, store: self.clone(), closed: false })
    }

    /// Makes a blob's metadata changes durable.
    pub async fn sync_blob(&self, id: u64) -> Result<(), BlobError> {
        self.on_home(move |e| async move { e.sync_blob(id).await }).await
    }

    /// Allocates clusters of a thin blob now (those not allocated yet), in
    /// one journal record: for an owner that knows where its next writes
    /// go. Durable when this returns.
    pub async fn allocate_clusters(&self, id: u64, clusters: Vec<u64>) -> Result<(), BlobError> {
        self.on_home(move |e| async move { e.allocate_clusters(id, &clusters).await }).await
    }

    /// Resizes a blob (durable at the next sync).
    pub async fn resize_blob(&self, id: u64, num_clusters: u64) -> Result<(), BlobError> {
        self.on_home(move |e| async move { e.resize_blob(id, num_clusters).await }).await
    }

    /// Deletes a closed blob.
    pub async fn delete_blob(&self, id: u64) -> Result<(), BlobError> {
        self.on_home(move |e| async move { e.delete_blob(id).await }).await
    }

    /// Sets an xattr (durable at the next sync).
    pub async fn set_xattr(&self, id: u64, name: &str, value: &[u8]) -> Result<(), BlobError> {
        let (name, value) = (name.to_string(), value.to_vec());
        self.on_home(move |e| async move { e.set_xattr(id, &name, value) }).await
    }

    /// Removes an xattr (durable at the next sync).
    pub async fn remove_xattr(&self, id: u64, name: &str) -> Result<(), BlobError> {
        let name = name.to_string();
        self.on_home(move |e| async move { e.remove_xattr(id, &name) }).await
    }

    /// A blob's xattrs.
    pub async fn xattrs(&self, id: u64) -> Result<BTreeMap<String, Vec<u8>>, BlobError> {
        self.on_home(move |e| async move { e.xattrs(id) }).await
    }

    /// Snapshots a blob; returns the snapshot's id.
    pub async fn snapshot(&self, id: u64, xattrs: BTreeMap<String, Vec<u8>>) -> Result<u64, BlobError> {
        self.on_home(move |e| async move { e.snapshot(id, xattrs).await }).await
    }

    /// Clones a snapshot; returns the clone's id.
    pub async fn clone_blob(&self, snapshot: u64, xattrs: BTreeMap<String, Vec<u8>>) -> Result<u64, BlobError> {
        self.on_home(move |e| async move { e.clone_blob(snapshot, xattrs).await }).await
    }

    /// Allocates every cluster of a blob, making it independent of its parents.
    pub async fn inflate(&self, id: u64) -> Result<(), BlobError> {
        self.on_home(move |e| async move { e.inflate(id).await }).await
    }

    /// Copies what a blob's parent holds; the grandparent becomes the parent.
    pub async fn decouple(&self, id: u64) -> Result<(), BlobError> {
        self.on_home(move |e| async move { e.decouple(id).await }).await
    }

    /// Sets or clears the super blob (the application's root).
    pub async fn set_super(&self, id: Option<u64>) -> Result<(), BlobError> {
        self.on_home(move |e| async move { e.set_super(id).await }).await
    }

    /// The super blob.
    pub async fn get_super(&self) -> Result<Option<u64>, BlobError> {
        self.on_home(move |e| async move { Ok(e.get_super()) }).await
    }

    /// Facts about a blob.
    pub async fn info(&self, id: u64) -> Result<BlobInfo, BlobError> {
        self.on_home(move |e| async move { e.info(id) }).await
    }

    /// Every blob, ascending by id.
    pub async fn list(&self) -> Result<Vec<BlobInfo>, BlobError> {
        self.on_home(move |e| async move { e.ids().into_iter().map(|id| e.info(id)).collect() }).await
    }

    /// Statistics.
    pub async fn stats(&self) -> Result<StoreStats, BlobError> {
        let g = self.shared.geometry;
        let bdev = self.bdev_name();
        let free = self.shared.free_clusters.load(Ordering::Relaxed);
        self.on_home(move |e| async move {
            let inner = e.inner.borrow();
            Ok(StoreStats {
                bdev,
                cluster_size: g.cluster_size,
                total_clusters: g.num_clusters,
                free_clusters: free,
                md_clusters: g.md_clusters,
                journal_pages: g.journal_pages,
                journal_used_pages: e.journal_used(),
                blobs: inner.blobs.len() as u64,
                super_blob: inner.durable.super_blob,
                checkpoint: inner.checkpoint.generation,
                ops: inner.stats.clone(),
            })
        })
        .await
    }

    /// Checks the durable metadata: every cluster owned once, the allocation
    /// bitmap equal to what is owned. Returns the problems (none: consistent).
    pub async fn check(&self) -> Result<Vec<String>, BlobError> {
        self.on_home(move |e| async move {
            let inner = e.inner.borrow();
            let refs: Vec<&crate::format::CheckpointRef> =
                [Some(&inner.checkpoint), inner.previous.as_ref()].into_iter().flatten().collect();
            Ok(inner.durable.check(&refs))
        })
        .await
    }

    /// Runs a blob request on reactor `on` from any thread (a FUSE worker, a
    /// tokio task) and waits for it. Fails only if the reactor is gone or the
    /// store unloaded; the request's own status is in the completion.
    pub async fn io(&self, on: &ReactorHandle, io: BlobIo) -> Result<BlobCompletion, BlobError> {
        let store = self.clone();
        on.spawn(move |ctx| {
            let ch = store.channel(ctx);
            async move { Ok(ch?.io(io).await) }
        })
        .await
        .map_err(|_| BlobError::ReactorGone)?
    }

    /// This reactor's channel for blob I/O.
    pub fn channel(&self, ctx: &mut Ctx<'_>) -> Result<BlobChannel, BlobError> {
        if self.shared.unloaded.load(Ordering::Acquire) {
            return Err(BlobError::Unloaded);
        }
        Ok(BlobChannel { ch: crate::channel::channel(&self.shared, ctx)? })
    }
}

/// Installs an empty engine slot on the home reactor and opens its channel.
fn install(
    store: &Arc<StoreShared>,
    ctx: &mut Ctx<'_>,
) -> Result<(Rc<EngineSlot>, crate::engine::mdio::MdIo), BlobError> {
    let slot = Rc::new(EngineSlot::default());
    ctx.insert_local(store.key, slot.clone());
    Ok((slot, home_io(store, ctx)?))
}

/// Puts a ready engine in its slot and starts its journal writer (inside a home task).
fn run(slot: &Rc<EngineSlot>, engine: &Rc<Engine>) {
    *slot.0.borrow_mut() = Some(engine.clone());
    engine.set_slot(slot);
    let e = engine.clone();
    pmd::task::spawn_local(async move { e.committer().await });
}

/// Reads the geometry a store on `bdev` was formatted with (its super block).
async fn read_geometry(
    registry: &BdevRegistry,
    bdev: &str,
    home: &ReactorHandle,
) -> Result<crate::format::Geometry, BlobError> {
    let desc = registry.open(bdev, false)?;
    let name = bdev.to_string();
    let rx = home.spawn(move |ctx| {
        let ch = desc.channel(ctx);
        async move {
            let mut ch = ch?;
            let buf = pmd::DmaBuf::new(2 * PAGE_SIZE)?;
            let blocks = 2 * PAGE_SIZE as u64 / desc.bdev().block_size() as u64;
            if desc.bdev().num_blocks() < blocks {
                return Err(BlobError::NotABlobstore { bdev: name, reason: "too small to hold super blocks".into() });
            }
            let c = ch.run_one(nvme::Io::read(0, buf, 0)).await;
            c.status.map_err(|e| BlobError::io(format!("reading the super blocks of {name}"), e))?;
            let buf = c.bufs.into_one().expect("one buffer");
            let mut problems = Vec::new();
            let mut best: Option<(u64, SuperBlock)> = None;
            for slot in 0..2 {
                match decode_page(&buf[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE], crate::format::Seed::NONE) {
                    Ok((h, body)) => match SuperBlock::decode(body) {
                        Ok(sb) if best.as_ref().is_none_or(|(s, _)| h.seq > *s) => best = Some((h.seq, sb)),
                        Ok(_) => {}
                        Err(e) => problems.push(format!("copy {slot}: {e}")),
                    },
                    Err(e) => problems.push(format!("copy {slot}: {e}")),
                }
            }
            let (_, sb) = best.ok_or_else(|| BlobError::NotABlobstore { bdev: name.clone(), reason: problems.join("; ") })?;
            let g = sb.geometry;
            let size = desc.bdev().size_bytes();
            if g.num_clusters * g.cluster_size as u64 > size || g.block_size != desc.bdev().block_size() {
                return Err(BlobError::NotABlobstore {
                    bdev: name,
                    reason: format!(
                        "it was formatted for {} clusters of {} bytes on {}-byte blocks; the bdev has {size} bytes of {}-byte blocks",
                        g.num_clusters,
                        g.cluster_size,
                        g.block_size,
                        desc.bdev().block_size()
                    ),
                });
            }
            Ok(g)
        }
    });
    rx.await.map_err(|_| BlobError::HomeGone)?
}

/// An open blob. Close it with [`Blob::close`] (dropping it closes without a sync).
pub struct Blob {
    shared: Arc<BlobShared>,
    store: Blobstore,
    closed: bool,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob").field("id", &self.shared.id()).finish()
    }
}

impl Blob {
    /// The blob's id.
    pub fn id(&self) -> u64 {
        self.shared.id()
    }

    /// What requests name ([`BlobIo`]).
    pub fn shared(&self) -> &Arc<BlobShared> {
        &self.shared
    }

    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        self.shared.num_clusters()
    }

    /// Syncs the blob's metadata and closes the handle.
    pub async fn close(mut self) -> Result<(), BlobError> {
        self.closed = true;
        let id = self.id();
        self.store.on_home(move |e| async move { e.close_blob(id).await }).await
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        if !self.closed {
            let (id, key) = (self.shared.id(), self.store.shared.key);
            self.store.shared.home.send(move |ctx| {
                if let Some(e) = Engine::lookup_slot(ctx, key) {
                    let _ = e.with_open(id, |open| *open = open.saturating_sub(1));
                }
            });
        }
    }
}

/// This reactor's data path to a store.
pub struct BlobChannel {
    ch: IoChannel<BsChannel>,
}

impl BlobChannel {
    /// Submits a request; its completion comes from a later
    /// [`BlobChannel::poll`]. Tags must leave the top bit clear (it marks
    /// requests awaited by [`BlobChannel::io`]): a request with it set fails.
    pub fn submit(&self, now: u64, io: BlobIo) {
        let mut ch = self.ch.borrow_mut();
        if io.tag & crate::channel::WAITED != 0 {
            return ch.refuse(io, nvme::IoError::Invalid);
        }
        ch.submit(now, io);
    }

    /// Runs a request and waits for its completion, from a task on this
    /// channel's reactor. Requests of tasks and of [`BlobChannel::poll`]
    /// users share the channel without seeing each other's completions.
    pub async fn io(&self, io: BlobIo) -> BlobCompletion {
        let tag = io.tag;
        let w = self.ch.borrow_mut().submit_waited(pmd::task::now(), io);
        let c = std::future::poll_fn(|cx| match self.ch.borrow_mut().waited_poll(w, cx.waker()) {
            Some(c) => std::task::Poll::Ready(c),
            None => std::task::Poll::Pending,
        })
        .await;
        BlobCompletion { tag, ..c }
    }

    /// Appends finished requests to `out`; returns how many.
    pub fn poll(&self, now: u64, out: &mut Vec<BlobCompletion>) -> usize {
        let mut ch = self.ch.borrow_mut();
        ch.poll_device(now);
        ch.take_done(out)
    }

    /// Requests submitted and not yet returned.
    pub fn outstanding(&self) -> usize {
        self.ch.borrow_mut().outstanding()
    }
}
