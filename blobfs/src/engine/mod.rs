//! The metadata engine: lives on the store's home reactor and owns its
//! metadata. Blob operations are tasks on that reactor (see `ops.rs`).
//!
//! Two views of the metadata are kept:
//!
//! - the *durable* state ([`State`]): exactly what a load would rebuild — the
//!   last checkpoint plus every journal record whose write has completed;
//! - the *live* view: every blob's metadata including changes not synced yet,
//!   and the live allocation bitmap = durable ∪ reserved ∪ freed-but-not-yet-
//!   released.
//!
//! A cluster becomes reusable only when the record freeing it is durable and
//! every channel has drained the I/O it sent before (a quiesce barrier), so
//! no request in flight can touch a cluster that has a new owner.

mod journal;
pub(crate) mod mdio;
pub(crate) mod ops;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nvme::{BdevDesc, IoError};
use pmd::{Ctx, ReactorId};
use tokio::sync::{Mutex as LocalLock, Notify, oneshot};

use crate::error::BlobError;
use crate::format::{
    BlobMd, CheckpointHeader, CheckpointRef, FLAG_NO_ZERO, FLAG_READ_ONLY, Geometry, JournalPos,
    MAX_CHECKPOINT_EXTENTS, Op, PAGE_SIZE, PageHeader, PageKind, Seed, SuperBlock, decode_checkpoint, decode_page,
    encode_checkpoint, encode_page, encode_pages,
};
use crate::shared::{BlobShared, StoreShared};
use crate::state::{Bitmap, State};
use mdio::MdIo;

/// Above this size, a batch's ops are split over several records.
const MAX_RECORD_BYTES: usize = 256 << 10;

/// A blob as the engine keeps it.
pub(crate) struct Live {
    pub md: BlobMd,
    pub shared: Arc<BlobShared>,
    pub open: u32,
    pub dirty: bool,
    pub lock: Rc<LocalLock<()>>,
}

/// A record waiting for the journal.
struct Pending {
    ops: Vec<Op>,
    done: oneshot::Sender<Result<(), BlobError>>,
}

pub(crate) struct Inner {
    pub durable: State,
    pub live_bitmap: Bitmap,
    pub blobs: HashMap<u64, Live>,
    pub next_id: u64,
    pub super_seq: u64,
    pub checkpoint: CheckpointRef,
    pub previous: Option<CheckpointRef>,
    /// Where replay starts after the current checkpoint.
    replay: JournalPos,
    /// Where the next record goes.
    tail: JournalPos,
    /// After the last record applied to the durable state.
    applied: JournalPos,
    /// The oldest journal page still needed.
    head: u64,
    queue: VecDeque<Pending>,
    /// A journal write failed: the store takes no more metadata changes.
    pub failed: Option<String>,
    pending_allocs: HashMap<(u64, u64), Vec<ReactorId>>,
    pub stats: OpStats,
    stopping: bool,
}

/// Counters of metadata work.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct OpStats {
    /// Journal records written.
    pub records: u64,
    /// Journal writes (a write carries one or more records).
    pub journal_writes: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Clusters allocated on first write.
    pub allocations: u64,
}

pub(crate) struct Engine {
    pub store: Arc<StoreShared>,
    pub io: MdIo,
    pub uuid: [u8; 16],
    pub seed: Seed,
    pub inner: RefCell<Inner>,
    commit_wake: Notify,
    checkpoint_lock: LocalLock<()>,
    barrier_lock: LocalLock<()>,
    committer_done: Notify,
    slot: RefCell<std::rc::Weak<crate::store::EngineSlot>>,
}

/// Options of a new store.
#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    /// Bytes per cluster: a power of two, at least 4 KiB.
    pub cluster_size: u32,
    /// Pages in the journal ring (None: 1/256 of the device, from 64 pages to 16 MiB).
    pub journal_pages: Option<u64>,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self { cluster_size: 1 << 20, journal_pages: None }
    }
}

/// What a load found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// The store had been unloaded cleanly.
    pub clean: bool,
    /// Journal records replayed.
    pub replayed_records: u64,
    /// Why replay stopped.
    pub replay_stopped: String,
    /// The newer super block copy was unusable and the older one was used.
    pub used_older_super: Option<String>,
    /// Blobs in the store.
    pub blobs: u64,
    /// Checkpoint generation loaded.
    pub checkpoint: u64,
}

fn pages_of(bytes: usize) -> u64 {
    (bytes / PAGE_SIZE) as u64
}

impl Engine {
    /// The engine of store `key`, if this reactor is its home and it is up.
    pub fn lookup_slot(ctx: &Ctx<'_>, key: u64) -> Option<Rc<Engine>> {
        ctx.local::<crate::store::EngineSlot>(key).and_then(|s| s.0.borrow().clone())
    }

    /// Empties the engine's slot on its home reactor (unload, abandon).
    pub fn uninstall(&self) {
        if let Some(slot) = self.slot.borrow().upgrade() {
            slot.0.borrow_mut().take();
        }
    }

    /// Remembers the slot the engine is installed in.
    pub fn set_slot(&self, slot: &Rc<crate::store::EngineSlot>) {
        *self.slot.borrow_mut() = Rc::downgrade(slot);
    }

    /// Stops the engine without writing anything more (what a crash leaves).
    pub async fn abandon(&self) {
        let queued: Vec<Pending> = {
            let mut inner = self.inner.borrow_mut();
            inner.stopping = true;
            inner.queue.drain(..).collect()
        };
        for p in queued {
            let _ = p.done.send(Err(BlobError::Unloaded));
        }
        self.commit_wake.notify_one();
        self.committer_done.notified().await;
    }

    fn geometry(&self) -> &Geometry {
        &self.store.geometry
    }

    fn publish_free(&self, inner: &Inner) {
        let free = inner.live_bitmap.len() - inner.live_bitmap.count();
        self.store.free_clusters.store(free, Ordering::Relaxed);
    }

    /// Writes a new store and returns its engine (not yet installed).
    pub async fn format(store: Arc<StoreShared>, io: MdIo, uuid: [u8; 16]) -> Result<Rc<Engine>, BlobError> {
        let g = store.geometry;
        let durable = State::empty(g);
        let start = JournalPos { seq: 1, page: 0 };
        let engine = Self::new(store, io, uuid, durable, 0, CheckpointRef::default(), None, start, start);
        // The first checkpoint writes both super block copies (a stale copy of an
        // earlier store in the other slot must not win).
        engine.write_checkpoint(false).await?;
        engine.io.flush().await?;
        Ok(engine)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        store: Arc<StoreShared>,
        io: MdIo,
        uuid: [u8; 16],
        durable: State,
        super_seq: u64,
        checkpoint: CheckpointRef,
        previous: Option<CheckpointRef>,
        replay: JournalPos,
        tail: JournalPos,
    ) -> Rc<Engine> {
        let live_bitmap = durable.bitmap.clone();
        let mut blobs: HashMap<u64, Live> = HashMap::new();
        // Parents first, so that every blob's shared map can point at its parent's.
        let mut order: Vec<&BlobMd> = durable.blobs.values().collect();
        order.sort_by_key(|b| depth(&durable, b.id));
        for md in order {
            let parent = md.parent.and_then(|p| blobs.get(&p)).map(|l| l.shared.clone());
            let shared = BlobShared::new(md.id, &md.clusters, parent, md.has(FLAG_READ_ONLY));
            blobs.insert(md.id, Live { md: md.clone(), shared, open: 0, dirty: false, lock: Rc::default() });
        }
        let next_id = durable.next_blob_id;
        let engine = Rc::new(Engine {
            seed: Seed::of(&uuid),
            uuid,
            io,
            store,
            inner: RefCell::new(Inner {
                durable,
                live_bitmap,
                blobs,
                next_id,
                super_seq,
                checkpoint,
                previous,
                replay,
                tail,
                applied: tail,
                head: replay.page,
                queue: VecDeque::new(),
                failed: None,
                pending_allocs: HashMap::new(),
                stats: OpStats::default(),
                stopping: false,
            }),
            commit_wake: Notify::new(),
            checkpoint_lock: LocalLock::new(()),
            barrier_lock: LocalLock::new(()),
            committer_done: Notify::new(),
            slot: RefCell::new(std::rc::Weak::new()),
        });
        engine.publish_free(&engine.inner.borrow());
        engine
    }

    /// Loads a store: super block, checkpoint, journal replay. Unless
    /// `read_only`, marks it in use (a crash from then on is recognised).
    pub async fn load(
        store: Arc<StoreShared>,
        io: MdIo,
        bdev: &str,
        read_only: bool,
    ) -> Result<(Rc<Engine>, LoadReport), BlobError> {
        let pages = io.read_pages(0, 2, "the super blocks").await?;
        let (sb, super_seq, used_older_super) = pick_super(&pages, bdev)?;
        let g = sb.geometry;
        if g != store.geometry {
            return Err(BlobError::NotABlobstore {
                bdev: bdev.into(),
                reason: "geometry changed while loading".into(),
            });
        }
        let seed = Seed::of(&sb.uuid);
        let ck = &sb.checkpoint;
        let mut raw = Vec::with_capacity(ck.pages as usize * PAGE_SIZE);
        for (first, n) in runs(ck.page_numbers(&g)) {
            let buf = io.read_pages(first, n, "the checkpoint").await?;
            raw.extend_from_slice(&buf);
        }
        let mut payload = Vec::with_capacity(raw.len());
        for (i, (page, dev_page)) in raw.chunks(PAGE_SIZE).zip(ck.page_numbers(&g)).enumerate() {
            let location = || format!("checkpoint {} page {i} (device page {dev_page})", ck.generation);
            let (h, body) = decode_page(page, seed).map_err(|e| BlobError::corrupt(location(), e))?;
            if h.kind != PageKind::Checkpoint
                || h.seq != ck.generation
                || h.index as usize != i
                || h.count as u64 != ck.pages
            {
                return Err(BlobError::corrupt(
                    location(),
                    format!("page belongs to {:?} {} page {}/{}", h.kind, h.seq, h.index, h.count),
                ));
            }
            payload.extend_from_slice(body);
        }
        let location = format!("checkpoint {}", ck.generation);
        let decoded = decode_checkpoint(&payload, g.num_clusters).map_err(|e| BlobError::corrupt(&location, e))?;
        if decoded.header.generation != ck.generation || decoded.header.replay != sb.replay {
            return Err(BlobError::corrupt(&location, "its header does not match the super block"));
        }
        let mut durable = State::from_checkpoint(g, decoded).map_err(|e| BlobError::corrupt(&location, e))?;
        for ref_ck in [Some(ck), sb.previous.as_ref()].into_iter().flatten() {
            for &(s, n) in &ref_ck.extents {
                if (s..s + n).any(|c| !durable.bitmap.get(c)) {
                    return Err(BlobError::corrupt(
                        &location,
                        format!("checkpoint {} clusters are marked free", ref_ck.generation),
                    ));
                }
            }
        }
        let ring = io.read_pages(g.journal_start, g.journal_pages, "the journal").await?;
        let replayed = journal::replay(&ring, sb.replay, seed, &mut durable).map_err(|e| {
            BlobError::corrupt(format!("journal page {} (device page {})", e.page, g.journal_start + e.page), e.reason)
        })?;
        if sb.clean && replayed.records > 0 {
            tracing::warn!(
                bdev,
                records = replayed.records,
                "a cleanly unloaded store had journal records after its checkpoint; replayed them"
            );
        }
        let report = LoadReport {
            clean: sb.clean,
            replayed_records: replayed.records,
            replay_stopped: replayed.stopped,
            used_older_super,
            blobs: durable.blobs.len() as u64,
            checkpoint: ck.generation,
        };
        let engine =
            Self::new(store, io, sb.uuid, durable, super_seq, sb.checkpoint, sb.previous, sb.replay, replayed.tail);
        // Mark the store in use before anything changes, so that a crash from now
        // on is recognised as one.
        if !read_only {
            engine.write_super(false).await?;
        }
        Ok((engine, report))
    }

    /// Queues a record; the returned receiver answers when it is durable.
    /// Nothing awaits between building the ops and queueing them, so records
    /// are journaled in the order the live state changed.
    pub fn enqueue(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), BlobError>> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.borrow_mut();
        if let Some(f) = &inner.failed {
            let _ = tx
                .send(Err(BlobError::io(format!("the journal (store stopped taking changes: {f})"), IoError::Device)));
        } else if inner.stopping {
            let _ = tx.send(Err(BlobError::Unloaded));
        } else {
            inner.queue.push_back(Pending { ops, done: tx });
            self.commit_wake.notify_one();
        }
        rx
    }

    /// Writes a record and waits until it is durable.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<(), BlobError> {
        self.enqueue(ops).await.map_err(|_| BlobError::Unloaded)?
    }

    /// The journal writer: one batch of records at a time, in order.
    pub(crate) async fn committer(self: Rc<Self>) {
        loop {
            let batch: Vec<Pending> = {
                let mut inner = self.inner.borrow_mut();
                if inner.queue.is_empty() && inner.stopping {
                    break;
                }
                inner.queue.drain(..).take(1024).collect()
            };
            if batch.is_empty() {
                self.commit_wake.notified().await;
                continue;
            }
            let result = self.write_batch(&batch).await;
            let mut freed = Vec::new();
            match result {
                Ok(()) => {
                    let mut inner = self.inner.borrow_mut();
                    for p in &batch {
                        for op in &p.ops {
                            match inner.durable.apply(op) {
                                Ok(f) => freed.extend(f),
                                Err(e) => {
                                    tracing::error!(
                                        "blobstore: a journaled op does not apply ({e}); the store takes no more changes"
                                    );
                                    inner.failed = Some(e.0.clone());
                                }
                            }
                        }
                    }
                }
                Err(ref e) => {
                    tracing::error!("blobstore: journal write failed: {e}; the store takes no more metadata changes");
                    self.inner.borrow_mut().failed = Some(e.to_string());
                }
            }
            let failed = self.inner.borrow().failed.clone();
            for p in batch {
                let r = match (&result, &failed) {
                    (Ok(()), None) => Ok(()),
                    (_, Some(f)) => Err(BlobError::io(format!("the journal ({f})"), IoError::Device)),
                    (Err(_), None) => unreachable!("a failed write sets failed"),
                };
                let _ = p.done.send(r);
            }
            if !freed.is_empty() {
                let e = self.clone();
                pmd::task::spawn_local(async move { e.release(freed).await });
            }
            let need_checkpoint = {
                let inner = self.inner.borrow();
                self.used_pages(&inner) > self.geometry().journal_pages / 2
            };
            if need_checkpoint && self.checkpoint_lock.try_lock().is_ok() {
                let e = self.clone();
                pmd::task::spawn_local(async move {
                    if let Err(err) = e.checkpoint(false).await {
                        tracing::error!("blobstore: checkpoint failed: {err}");
                    }
                });
            }
        }
        self.committer_done.notify_one();
    }

    /// Journal pages holding records a load would replay.
    pub fn journal_used(&self) -> u64 {
        self.used_pages(&self.inner.borrow())
    }

    fn used_pages(&self, inner: &Inner) -> u64 {
        let j = self.geometry().journal_pages;
        (inner.tail.page + j - inner.head) % j
    }

    async fn write_batch(&self, batch: &[Pending]) -> Result<(), BlobError> {
        // The batch's ops go in as few records as possible: none of them was
        // acknowledged before the write completes, so one atomic record for
        // many waiters is as correct as one each, and far smaller.
        let mut records: Vec<Vec<Op>> = vec![Vec::new()];
        let mut bytes = 0;
        for p in batch {
            let size = crate::format::encode_ops(&p.ops).len();
            if bytes + size > MAX_RECORD_BYTES && !records.last().is_some_and(Vec::is_empty) {
                records.push(Vec::new());
                bytes = 0;
            }
            records.last_mut().expect("never empty").extend(p.ops.iter().cloned());
            bytes += size;
        }
        let j = self.geometry().journal_pages;
        let placements = loop {
            let (tail, free) = {
                let inner = self.inner.borrow();
                (inner.tail, j - self.used_pages(&inner) - 1)
            };
            match journal::layout(&records, tail, j, free, self.seed) {
                Some((placements, new_tail, _)) => {
                    self.inner.borrow_mut().tail = new_tail;
                    break placements;
                }
                None if free + 1 < j => {
                    // The ring is full: a checkpoint lets its head move.
                    self.checkpoint(false).await?;
                }
                None => {
                    return Err(BlobError::invalid(
                        "record",
                        format!("a metadata record larger than the {j}-page journal"),
                    ));
                }
            }
        };
        for p in &placements {
            self.io.write_pages(self.geometry().journal_start + p.page, &p.bytes, true, "the journal").await?;
        }
        let mut inner = self.inner.borrow_mut();
        inner.applied = inner.tail;
        inner.stats.records += records.len() as u64;
        inner.stats.journal_writes += 1;
        Ok(())
    }

    /// Makes freed clusters reusable once no I/O sent before can touch them.
    async fn release(self: Rc<Self>, clusters: Vec<u64>) {
        self.barrier().await;
        let mut inner = self.inner.borrow_mut();
        for c in clusters {
            inner.live_bitmap.clear(c);
        }
        self.publish_free(&inner);
    }

    /// Waits until every channel has completed the I/O it sent before now.
    pub async fn barrier(&self) {
        let _serial = self.barrier_lock.lock().await;
        let mut waits = Vec::new();
        for r in self.store.channel_reactors() {
            let (tx, rx) = oneshot::channel();
            let store = self.store.clone();
            if let Some(peer) = self.store.home.peer(r) {
                peer.send(move |ctx| match ctx.existing_io_channel(&store) {
                    Some(ch) => ch.borrow_mut().barrier(tx),
                    None => {
                        let _ = tx.send(());
                    }
                });
                waits.push(rx);
            }
        }
        for w in waits {
            let _ = w.await;
        }
    }

    /// Stops new I/O on a blob and waits for the I/O in flight.
    pub async fn freeze(&self, blob: &Arc<BlobShared>) {
        blob.set_frozen(true);
        self.barrier().await;
    }

    /// Lets a frozen blob's I/O go on.
    pub fn thaw(&self, blob: &Arc<BlobShared>) {
        blob.set_frozen(false);
        self.wake_channels();
    }

    fn wake_channels(&self) {
        for r in self.store.channel_reactors() {
            let store = self.store.clone();
            if let Some(peer) = self.store.home.peer(r) {
                peer.send(move |ctx| {
                    if let Some(ch) = ctx.existing_io_channel(&store) {
                        ch.borrow_mut().wake();
                    }
                });
            }
        }
    }

    /// Reserves `n` free clusters in the live bitmap.
    pub fn reserve(&self, n: u64) -> Result<Vec<u64>, BlobError> {
        let mut inner = self.inner.borrow_mut();
        let free = inner.live_bitmap.len() - inner.live_bitmap.count();
        if n > free {
            return Err(BlobError::NoSpace { needed: n, free });
        }
        let mut out = Vec::with_capacity(n as usize);
        let mut hint = self.geometry().md_clusters;
        for _ in 0..n {
            let c = inner.live_bitmap.find_clear(hint).expect("counted free clusters above");
            inner.live_bitmap.set(c);
            out.push(c);
            hint = c + 1;
        }
        self.publish_free(&inner);
        Ok(out)
    }

    /// Gives back clusters reserved but never made durable.
    pub fn unreserve(&self, clusters: &[u64]) {
        let mut inner = self.inner.borrow_mut();
        for &c in clusters {
            if !inner.durable.bitmap.get(c) {
                inner.live_bitmap.clear(c);
            }
        }
        self.publish_free(&inner);
    }

    /// Zeroes reserved clusters, coalescing runs, and flushes.
    pub async fn zero(&self, clusters: &[u64]) -> Result<(), BlobError> {
        let mut sorted = clusters.to_vec();
        sorted.sort_unstable();
        for (start, n) in runs(sorted.into_iter()) {
            self.io.zero_clusters(start, n).await?;
        }
        if !clusters.is_empty() {
            self.io.flush().await?;
        }
        Ok(())
    }

    /// Writes the super block into the slot after the current one.
    async fn write_super(&self, clean: bool) -> Result<(), BlobError> {
        let (sb, seq) = {
            let mut inner = self.inner.borrow_mut();
            inner.super_seq += 1;
            let sb = SuperBlock {
                uuid: self.uuid,
                geometry: *self.geometry(),
                clean,
                checkpoint: inner.checkpoint.clone(),
                previous: inner.previous.clone(),
                replay: inner.replay,
            };
            (sb, inner.super_seq)
        };
        let mut page = vec![0u8; PAGE_SIZE];
        let header = PageHeader { kind: PageKind::Super, seq, aux: 0, index: 0, count: 1 };
        encode_page(&mut page, &header, &sb.encode(), Seed::NONE);
        self.io.write_pages(seq % 2, &page, true, "a super block").await?;
        if seq == 1 {
            // A fresh store: the other slot gets the same content, as commit 0.
            encode_page(&mut page, &PageHeader { seq: 0, ..header }, &sb.encode(), Seed::NONE);
            self.io.write_pages(0, &page, true, "a super block").await?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the durable state into new clusters, then the
    /// super block pointing at it. Frees the checkpoint before the previous one
    /// and the journal before the new replay position.
    pub async fn checkpoint(&self, clean: bool) -> Result<(), BlobError> {
        let _one_at_a_time = self.checkpoint_lock.lock().await;
        self.write_checkpoint(clean).await
    }

    async fn write_checkpoint(&self, clean: bool) -> Result<(), BlobError> {
        let g = *self.geometry();
        // Serialise the durable state as of `applied`, all in one step.
        let (bytes, clusters, generation, replay) = {
            let inner = self.inner.borrow();
            let generation = inner.checkpoint.generation + 1;
            let replay = inner.applied;
            let header = CheckpointHeader {
                generation,
                replay,
                next_blob_id: inner.durable.next_blob_id,
                super_blob: inner.durable.super_blob,
            };
            let mut bitmap = inner.durable.bitmap.clone();
            let bytes_estimate =
                encode_checkpoint(&header, bitmap.words(), g.num_clusters, inner.durable.blobs.values()).len();
            let pages = bytes_estimate.div_ceil(crate::format::PAYLOAD_LEN) as u64;
            let n = pages.div_ceil(g.pages_per_cluster());
            drop(inner);
            let clusters = self.reserve_run(n)?;
            let inner = self.inner.borrow();
            // The bitmap as it will be once this checkpoint commits.
            swap_checkpoint_bits(&mut bitmap, &clusters, inner.previous.as_ref(), true);
            let bytes = encode_checkpoint(&header, bitmap.words(), g.num_clusters, inner.durable.blobs.values());
            (bytes, clusters, generation, replay)
        };
        let pages = encode_pages(PageKind::Checkpoint, generation, 0, &bytes, self.seed);
        let new_ref = CheckpointRef { generation, pages: pages_of(pages.len()), extents: clusters.clone() };
        let result = async {
            let mut at = 0;
            for (first, n) in runs(new_ref.page_numbers(&g)) {
                let len = n as usize * PAGE_SIZE;
                self.io.write_pages(first, &pages[at..at + len], false, "a checkpoint").await?;
                at += len;
            }
            self.io.flush().await
        }
        .await;
        if let Err(e) = result {
            let flat: Vec<u64> = clusters.iter().flat_map(|&(s, n)| s..s + n).collect();
            self.unreserve(&flat);
            return Err(e);
        }
        // Point the super block at the new checkpoint; on failure, back out.
        // The durable bitmap changes in the same step as the references, so
        // whoever looks while the super block is written (a check, the used
        // count) sees a whole state. The dropped checkpoint's clusters stay
        // reserved in the live bitmap until the super block no longer names it.
        let saved = {
            let mut inner = self.inner.borrow_mut();
            let saved = (inner.checkpoint.clone(), inner.previous.clone(), inner.replay);
            inner.previous = (generation > 1).then(|| std::mem::replace(&mut inner.checkpoint, new_ref.clone()));
            inner.checkpoint = new_ref.clone();
            inner.replay = replay;
            swap_checkpoint_bits(&mut inner.durable.bitmap, &clusters, saved.1.as_ref(), true);
            saved
        };
        if let Err(e) = self.write_super(clean).await {
            let mut inner = self.inner.borrow_mut();
            swap_checkpoint_bits(&mut inner.durable.bitmap, &clusters, saved.1.as_ref(), false);
            (inner.checkpoint, inner.previous, inner.replay) = saved;
            drop(inner);
            let flat: Vec<u64> = clusters.iter().flat_map(|&(s, n)| s..s + n).collect();
            self.unreserve(&flat);
            return Err(e);
        }
        let mut inner = self.inner.borrow_mut();
        if let Some(old) = saved.1 {
            for &(s, n) in &old.extents {
                for c in s..s + n {
                    inner.live_bitmap.clear(c);
                }
            }
        }
        inner.head = replay.page;
        inner.stats.checkpoints += 1;
        self.publish_free(&inner);
        tracing::debug!(generation, pages = new_ref.pages, "checkpoint written");
        Ok(())
    }

    /// Reserves clusters for a checkpoint in as few runs as possible.
    fn reserve_run(&self, n: u64) -> Result<Vec<(u64, u64)>, BlobError> {
        let mut inner = self.inner.borrow_mut();
        let free = inner.live_bitmap.len() - inner.live_bitmap.count();
        if n > free {
            return Err(BlobError::NoSpace { needed: n, free });
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        if let Some(start) = inner.live_bitmap.find_clear_run(n) {
            out.push((start, n));
        } else {
            let mut hint = self.geometry().md_clusters;
            for _ in 0..n {
                let c = inner.live_bitmap.find_clear(hint).expect("counted above");
                match out.last_mut() {
                    Some((s, len)) if *s + *len == c => *len += 1,
                    _ => out.push((c, 1)),
                }
                hint = c + 1;
            }
            if out.len() > MAX_CHECKPOINT_EXTENTS {
                return Err(BlobError::NoSpace { needed: n, free });
            }
        }
        for &(s, len) in &out {
            for c in s..s + len {
                inner.live_bitmap.set(c);
            }
        }
        self.publish_free(&inner);
        Ok(out)
    }

    /// Syncs every blob with unsynced changes, writes the last checkpoint,
    /// marked clean, and stops the journal writer. Refused while blobs are open.
    pub async fn unload(self: &Rc<Self>) -> Result<(), BlobError> {
        let dirty: Vec<u64> = {
            let inner = self.inner.borrow();
            let mut open: Vec<u64> = inner.blobs.values().filter(|b| b.open > 0).map(|b| b.shared.id()).collect();
            open.sort_unstable();
            if !open.is_empty() {
                return Err(BlobError::Busy(open));
            }
            inner.blobs.values().filter(|b| b.dirty).map(|b| b.shared.id()).collect()
        };
        for id in dirty {
            self.sync_blob(id).await?;
        }
        self.inner.borrow_mut().stopping = true;
        self.commit_wake.notify_one();
        self.committer_done.notified().await;
        self.barrier().await;
        if let Some(f) = self.inner.borrow().failed.clone() {
            return Err(BlobError::io(format!("the journal ({f}); unloaded without a clean mark"), IoError::Device));
        }
        self.checkpoint(true).await?;
        self.io.flush().await
    }

    /// Handles a data-path request for a cluster of a blob (on the home reactor).
    pub fn allocate(self: &Rc<Self>, ctx: &mut Ctx<'_>, blob: u64, cluster: u64, reactor: ReactorId) {
        let first = {
            let mut inner = self.inner.borrow_mut();
            let waiters = inner.pending_allocs.entry((blob, cluster)).or_default();
            waiters.push(reactor);
            waiters.len() == 1
        };
        if !first {
            return;
        }
        let e = self.clone();
        ctx.spawn(async move {
            let result = e.do_allocate(blob, cluster).await;
            if let Err(err) = &result {
                tracing::warn!(blob, cluster, "allocating a cluster for a write failed: {err}");
            }
            let status = result.map_err(|err| match err {
                BlobError::NoSpace { .. } => IoError::NoSpace,
                BlobError::NoSuchBlob(_) | BlobError::Unloaded => IoError::Removed,
                _ => IoError::Device,
            });
            let waiters = e.inner.borrow_mut().pending_allocs.remove(&(blob, cluster)).unwrap_or_default();
            for r in waiters {
                let store = e.store.clone();
                if let Some(peer) = e.store.home.peer(r) {
                    peer.send(move |ctx| {
                        if let Some(ch) = ctx.existing_io_channel(&store) {
                            ch.borrow_mut().allocation_done(blob, cluster, status);
                        }
                    });
                }
            }
        });
    }

    /// Allocates `cluster` of `blob`, and with it every other cluster of the
    /// blob that a write waits for now: allocations of one blob run one at a
    /// time, and a stream of first writes would otherwise wait for one
    /// journal flush per cluster. The tasks of the others find their cluster
    /// allocated and answer.
    async fn do_allocate(self: &Rc<Self>, blob: u64, cluster: u64) -> Result<(), BlobError> {
        let (lock, _) = self.blob(blob)?;
        let _guard = lock.lock().await;
        let mut clusters: Vec<u64> =
            self.inner.borrow().pending_allocs.keys().filter(|&&(b, _)| b == blob).map(|&(_, c)| c).collect();
        clusters.sort_unstable();
        match self.allocate_locked(blob, &clusters).await {
            Err(BlobError::NoSpace { .. }) if clusters.len() > 1 => self.allocate_locked(blob, &[cluster]).await,
            r => r,
        }
    }

    /// Allocates the clusters of a thin blob that are not allocated yet
    /// (ahead of the writes that will land there), in one record.
    pub async fn allocate_clusters(self: &Rc<Self>, blob: u64, clusters: &[u64]) -> Result<(), BlobError> {
        let (lock, _) = self.blob(blob)?;
        if self.with_live(blob, |b| b.md.has(FLAG_READ_ONLY))? {
            return Err(BlobError::ReadOnly(blob));
        }
        let _guard = lock.lock().await;
        self.allocate_locked(blob, clusters).await
    }

    /// Allocates those of `clusters` still unallocated in `blob`,
    /// whose lock the caller holds.
    async fn allocate_locked(self: &Rc<Self>, blob: u64, clusters: &[u64]) -> Result<(), BlobError> {
        let (shared, no_zero) = self.with_live(blob, |b| (b.shared.clone(), b.md.has(FLAG_NO_ZERO)))?;
        // Resized away, or allocated meanwhile: a waiting request is translated again.
        let clusters: Vec<u64> =
            clusters.iter().copied().filter(|&c| c < shared.num_clusters() && shared.own(c) == 0).collect();
        if clusters.is_empty() {
            return Ok(());
        }
        let phys = self.reserve(clusters.len() as u64)?;
        let prepared = async {
            let mut written = false;
            for (&c, &p) in clusters.iter().zip(&phys) {
                match shared.inherited(c) {
                    Some(src) => self.io.copy_cluster(src, p).await?,
                    None if no_zero => continue,
                    None => self.io.zero_clusters(p, 1).await?,
                }
                written = true;
            }
            if written { self.io.flush().await } else { Ok(()) }
        }
        .await;
        if let Err(e) = prepared {
            self.unreserve(&phys);
            return Err(e);
        }
        let rx = {
            let mut inner = self.inner.borrow_mut();
            // Bare allocations fit a durable blob that has these clusters unmapped;
            // after an unsynced resize they do not, and the blob's whole live
            // metadata (its pending changes included) goes in the record instead.
            let durable = inner.durable.blobs.get(&blob);
            let bare = clusters.iter().all(|&c| durable.and_then(|d| d.clusters.get(c as usize)) == Some(&0));
            let Some(live) = inner.blobs.get_mut(&blob) else {
                drop(inner);
                self.unreserve(&phys);
                return Err(BlobError::NoSuchBlob(blob));
            };
            for (&c, &p) in clusters.iter().zip(&phys) {
                live.md.clusters[c as usize] = p;
            }
            let ops = if bare {
                clusters.iter().zip(&phys).map(|(&index, &phys)| Op::Alloc { blob, index, phys }).collect()
            } else {
                live.md.md_seq += 1;
                live.dirty = false;
                vec![Op::PutBlob(live.md.clone())]
            };
            drop(inner);
            self.enqueue(ops)
        };
        match rx.await.map_err(|_| BlobError::Unloaded).and_then(|r| r) {
            Ok(()) => {
                for (&c, &p) in clusters.iter().zip(&phys) {
                    shared.set_cluster(c, p);
                }
                self.inner.borrow_mut().stats.allocations += clusters.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Some(live) = self.inner.borrow_mut().blobs.get_mut(&blob) {
                    for &c in &clusters {
                        live.md.clusters[c as usize] = 0;
                    }
                    live.dirty = true;
                }
                self.unreserve(&phys);
                Err(e)
            }
        }
    }
}

/// What `blobstore_check` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Nothing wrong.
    pub consistent: bool,
    /// What is wrong: damaged pages (with their location), clusters owned
    /// twice, clusters in use but owned by nothing.
    pub problems: Vec<String>,
    /// What loading found, if the metadata could be read at all.
    pub load: Option<LoadReport>,
    /// Clusters in use.
    pub used_clusters: u64,
    /// Clusters in the store.
    pub total_clusters: u64,
}

/// Marks a new checkpoint's clusters in use and a dropped one's free
/// (`commit`), or the reverse (backing out).
fn swap_checkpoint_bits(bitmap: &mut Bitmap, new: &[(u64, u64)], dropped: Option<&CheckpointRef>, commit: bool) {
    let dropped = dropped.map(|d| d.extents.as_slice()).unwrap_or_default();
    for (&(s, n), in_use) in new.iter().map(|e| (e, commit)).chain(dropped.iter().map(|e| (e, !commit))) {
        for c in s..s + n {
            if in_use {
                bitmap.set(c);
            } else {
                bitmap.clear(c);
            }
        }
    }
}

impl Engine {
    /// Checks the durable metadata: every cluster owned once, the bitmap equal
    /// to what is owned. Returns the problems found.
    pub fn check(&self) -> Vec<String> {
        let inner = self.inner.borrow();
        let refs: Vec<&CheckpointRef> =
            [Some(&inner.checkpoint), inner.previous.as_ref()].into_iter().flatten().collect();
        inner.durable.check(&refs)
    }

    /// Clusters the durable state has in use.
    pub fn used_clusters(&self) -> u64 {
        self.inner.borrow().durable.bitmap.count()
    }
}

/// Called by the data path on any reactor: asks the home reactor to allocate.
pub(crate) fn request_allocation(store: &Arc<StoreShared>, blob: u64, cluster: u64, reactor: ReactorId) {
    let key = store.key;
    let store2 = store.clone();
    store.home.send(move |ctx| match Engine::lookup_slot(ctx, key) {
        Some(engine) => engine.allocate(ctx, blob, cluster, reactor),
        None => {
            if let Some(peer) = store2.home.peer(reactor) {
                peer.send(move |ctx| {
                    if let Some(ch) = ctx.existing_io_channel(&store2) {
                        ch.borrow_mut().allocation_done(blob, cluster, Err(IoError::Removed));
                    }
                });
            }
        }
    });
}

/// Depth of a blob in its parent chain (for building parents first).
fn depth(state: &State, mut id: u64) -> usize {
    let mut d = 0;
    while let Some(p) = state.blobs.get(&id).and_then(|b| b.parent) {
        d += 1;
        id = p;
        if d > state.blobs.len() {
            break;
        }
    }
    d
}

/// Groups ascending numbers into (first, count) runs of consecutive ones.
pub(crate) fn runs(items: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for x in items {
        match out.last_mut() {
            Some((s, n)) if *s + *n == x => *n += 1,
            _ => out.push((x, 1)),
        }
    }
    out
}

/// Chooses the super block to load: the valid copy with the higher commit number.
fn pick_super(pages: &[u8], bdev: &str) -> Result<(SuperBlock, u64, Option<String>), BlobError> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for slot in 0..2 {
        let page = &pages[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE];
        let decoded = decode_page(page, Seed::NONE).map_err(|e| e.to_string()).and_then(|(h, body)| {
            if h.kind != PageKind::Super {
                return Err(format!("a {:?} page where a super block should be", h.kind));
            }
            SuperBlock::decode(body).map(|sb| (h.seq, sb)).map_err(|e| e.to_string())
        });
        match decoded {
            Ok(x) => found.push(x),
            Err(e) => problems.push(format!("copy {slot}: {e}")),
        }
    }
    found.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
    let Some((seq, sb)) = found.first().cloned() else {
        return Err(BlobError::NotABlobstore { bdev: bdev.into(), reason: problems.join("; ") });
    };
    // One copy unusable: a torn super block write, or damage. The other copy
    // (whose checkpoint is kept until the next one commits) is used.
    let older = (found.len() == 1).then(|| problems.join("; "));
    if let Some(o) = &older {
        tracing::warn!(bdev, "one super block copy is unusable ({o}); using the other, commit {seq}");
    }
    Ok((sb, seq, older))
}

/// Creates the engine's channel and md I/O on the home reactor.
pub(crate) fn home_io(store: &Arc<StoreShared>, ctx: &mut Ctx<'_>) -> Result<MdIo, BlobError> {
    let ch = crate::channel::channel(store, ctx)?;
    Ok(MdIo { ch, store: store.clone() })
}

/// Opens `desc`'s bdev as a store's device: geometry from the options or the super block.
pub(crate) fn geometry_for(desc: &BdevDesc, opts: &FormatOptions) -> Result<Geometry, BlobError> {
    let bdev = desc.bdev();
    let block = bdev.block_size();
    if block as usize > PAGE_SIZE {
        return Err(BlobError::invalid(
            "bdev",
            format!("{} has {block}-byte blocks; the blobstore needs at most 4096", bdev.name()),
        ));
    }
    let cs = opts.cluster_size;
    if (cs as usize) < PAGE_SIZE || !cs.is_power_of_two() || cs > 1 << 30 {
        return Err(BlobError::invalid("cluster_size", format!("{cs} is not a power of two from 4096 to 1 GiB")));
    }
    let bytes = bdev.size_bytes();
    let num_clusters = bytes / cs as u64;
    let ppc = cs as u64 / PAGE_SIZE as u64;
    let journal_pages = opts.journal_pages.unwrap_or_else(|| (bytes / PAGE_SIZE as u64 / 256).clamp(64, 4096)).max(16);
    let md_clusters = (2 + journal_pages).div_ceil(ppc);
    if num_clusters < md_clusters + 4 {
        return Err(BlobError::invalid(
            "bdev",
            format!(
                "{} ({bytes} bytes) is too small for {cs}-byte clusters and a {journal_pages}-page journal",
                bdev.name()
            ),
        ));
    }
    Ok(Geometry { cluster_size: cs, block_size: block, num_clusters, journal_start: 2, journal_pages, md_clusters })
}
