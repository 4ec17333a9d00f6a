//! The Raft log of the metadata group, in a blob.
//!
//! Entries are kept in memory from the last purge on (a snapshot bounds
//! them) and written behind to an append-only *log blob* as records:
//!
//! ```text
//! offset size
//!      0    4  magic "CFLR"
//!      4    4  payload length in bytes
//!      8    4  CRC32C of the previous record (0 for the first one)
//!     12    4  CRC32C of bytes 0..12 and the payload
//!     16    n  payload: postcard of a `Record`
//!            padding to the next 4 KiB page
//! ```
//!
//! Records start on page boundaries and pages are never rewritten while the
//! log is in use, so a torn write damages only the last record. Replay reads
//! records from page 0 until one is missing, damaged, or does not name its
//! predecessor's CRC: the chain stops a replay from running on into records
//! a previous run left beyond the point where this run started writing.
//!
//! A writer task writes whatever records have queued up as one request; the
//! next flush makes them durable (group commit, see [`Writer::run`]). Whether an append is reported to Raft as durable
//! at once or only after its flush is the [`Durability`] policy.
//!
//! **Rotation.** A purge (after a snapshot) lets go of entries, but their
//! records stay in the blob. Once the blob has grown to `rotate_at` pages,
//! the writer starts a new blob with one `Base` record holding the whole
//! log as it is now (vote, last purged id, entries), then switches the root
//! blob's `claudefs.fs.log` xattr to it and deletes the old blob; the next
//! rotation comes at twice the new blob's size (at least [`ROTATE_MIN`]
//! pages), so rotations cost at most half again the log's writes. The base
//! may already hold changes whose records are still queued; those records
//! follow it in the new blob and replaying them again changes nothing (each
//! sets or removes entries, so the last record touching an index decides).
//! A crash before the switch leaves the old log in place; the xattr
//! `claudefs.fs.log.discard` names the blob to delete at the next open.

// openraft's StorageError (large) is what every storage method returns.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::TypeConfig;
use crate::format::PAGE_SIZE;
use crate::{BlobIo, BlobShared, Blobstore};

const MAGIC: &[u8; 4] = b"CFLR";
const HEADER: usize = 16;
/// The most pages replay reads per request.
const READ_PAGES: u64 = 256;
/// The smallest log blob that is rotated (pages: 8 MiB).
pub const ROTATE_MIN: u64 = 2048;
/// The longest a written record waits for its flush when nobody waits for
/// it (see [`Writer::run`]).
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// Most records written as one batch.
const MAX_BATCH: usize = 1024;

/// When an append counts as durable for Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once its record is written and flushed (what a group of several
    /// members needs).
    Flushed,
    /// At once; the record is written behind and flushed within the group
    /// commit's next round, and [`LogStore::sync`] waits for it. A one-member
    /// group can do this: a crash then loses a suffix of the log, never a
    /// part of one, and what `fsync` waited for is never lost.
    WriteBehind,
}

/// What a record holds.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Entries(Vec<Entry<TypeConfig>>),
    /// Entries from this index on are gone.
    Truncate(u64),
    /// Entries up to and including this one are gone.
    Purge(LogId<u64>),
    Vote(Vote<u64>),
    /// The whole log, first in a rotated blob.
    Base {
        vote: Option<Vote<u64>>,
        purged: Option<LogId<u64>>,
        entries: Vec<Entry<TypeConfig>>,
    },
}

impl Record {
    /// The record's bytes, its chain and CRC still blank (see [`seal`]).
    fn encode(&self) -> Result<Vec<u8>> {
        let payload = postcard::to_stdvec(self).map_err(write_err)?;
        let mut bytes = Vec::with_capacity((HEADER + payload.len()).next_multiple_of(PAGE_SIZE));
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&payload);
        bytes.resize(bytes.len().next_multiple_of(PAGE_SIZE), 0);
        Ok(bytes)
    }
}

/// Where the log lives: its blob, held open, and the root blob naming it.
pub(crate) struct Place {
    /// The file system's root blob.
    pub(crate) root: u64,
    /// The log blob.
    pub(crate) blob: Arc<BlobShared>,
    /// Its handle, which [`super::MetaRaft::shutdown`] closes.
    pub(crate) held: Arc<crate::fs::HeldBlob>,
}

type Result<T> = std::result::Result<T, StorageError<u64>>;

fn write_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

/// The log: cheap to clone (the reader Raft asks for is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    queue: mpsc::UnboundedSender<Job>,
    /// Records durable so far (a count, in queue order).
    durable: watch::Receiver<u64>,
    durability: Durability,
    data_written: Arc<AtomicBool>,
    /// Someone waits for durability: the writer flushes now.
    urgent: Arc<tokio::sync::Notify>,
}

struct Inner {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    purged: Option<LogId<u64>>,
    vote: Option<Vote<u64>>,
    /// Records queued so far.
    queued: u64,
}

struct Job {
    bytes: Vec<u8>,
    flushed: Option<LogFlushed<TypeConfig>>,
}

/// The log blob's writer: where the next record goes and the CRC it chains to.
struct Writer {
    store: Blobstore,
    place: Place,
    next_page: u64,
    prev_crc: u32,
    /// Rotate once the blob holds this many pages.
    rotate_at: u64,
    /// Below this many free clusters in the store, rotate as soon as a
    /// purge has let go of part of the blob.
    low_space: u64,
    /// The last purge the blob's records start after.
    base_purged: Option<LogId<u64>>,
    /// The log's state (for a rotation's base record).
    inner: Arc<Mutex<Inner>>,
    /// Set when file data has been written since the last flush.
    data_written: Arc<AtomicBool>,
    /// Someone waits for durability.
    urgent: Arc<tokio::sync::Notify>,
}

impl LogStore {
    /// Opens the log in `blob` (a thin blob; empty for a new log), replays
    /// it, and starts its writer task on the current tokio runtime.
    pub(crate) async fn open(
        store: Blobstore,
        place: Place,
        durability: Durability,
    ) -> std::result::Result<LogStore, crate::BlobError> {
        let mut inner = Inner { entries: BTreeMap::new(), purged: None, vote: None, queued: 0 };
        let (next_page, prev_crc) = replay(&store, &place.blob, &mut inner).await?;
        let inner = Arc::new(Mutex::new(inner));
        let (queue, jobs) = mpsc::unbounded_channel();
        let (durable_tx, durable) = watch::channel(0);
        let rotate_at = ROTATE_MIN.max(2 * next_page);
        let total = store.stats().await?.total_clusters;
        let low_space = crate::fs::data::metadata_reserve(total, u64::from(store.cluster_size()));
        let base_purged = inner.lock().unwrap_or_else(|p| p.into_inner()).purged;
        let data_written = Arc::new(AtomicBool::new(false));
        let urgent = Arc::new(tokio::sync::Notify::new());
        let writer = Writer {
            store,
            place,
            next_page,
            prev_crc,
            rotate_at,
            low_space,
            base_purged,
            inner: inner.clone(),
            data_written: data_written.clone(),
            urgent: urgent.clone(),
        };
        tokio::spawn(writer.run(jobs, durable_tx));
        Ok(LogStore { inner, queue, durable, durability, data_written, urgent })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a record; returns its number (for [`LogStore::wait_durable`]).
    fn queue(&self, inner: &mut Inner, record: &Record, flushed: Option<LogFlushed<TypeConfig>>) -> Result<u64> {
        let bytes = record.encode()?;
        inner.queued += 1;
        let n = inner.queued;
        let waits = flushed.is_some();
        self.queue.send(Job { bytes, flushed }).map_err(|_| write_err(std::io::Error::other("log writer stopped")))?;
        if waits {
            // Its caller waits for the flush: no lingering.
            self.urgent.notify_one();
        }
        Ok(n)
    }

    async fn wait_durable(&self, n: u64) -> Result<()> {
        let mut durable = self.durable.clone();
        if *durable.borrow() < n {
            self.urgent.notify_one();
        }
        durable.wait_for(|&d| d >= n).await.map_err(|_| write_err(std::io::Error::other("log writer failed")))?;
        Ok(())
    }

    /// Records queued so far.
    pub fn queued(&self) -> u64 {
        self.lock().queued
    }

    /// Records durable so far.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }

    /// The flag the data path sets after each write of file data: the
    /// writer then flushes before its next records, so that no record is
    /// durable while the data it maps is not (a device may keep a later
    /// write and lose an earlier one, unless a flush stands between them).
    pub fn data_written(&self) -> Arc<AtomicBool> {
        self.data_written.clone()
    }

    /// Waits until every record queued so far is durable (what `fsync` needs).
    pub async fn sync(&self) -> Result<()> {
        let n = self.lock().queued;
        self.wait_durable(n).await
    }

    /// Index of the last entry (or of the last purged one), if any.
    pub fn last_index(&self) -> Option<u64> {
        let inner = self.lock();
        inner.entries.keys().next_back().copied().or(inner.purged.map(|p| p.index))
    }
}

impl Writer {
    /// Writes the queued records, batch by batch. Unless someone waits for
    /// durability ([`LogStore::sync`], a vote, a `Flushed` append), a batch
    /// gathers records for up to [`LINGER`] first. It is written without a
    /// flush of its own: the flush that makes it durable is the next one,
    /// which comes before the next batch if file data was written meanwhile
    /// (that data must be durable before a record mapping it), at once if
    /// someone waits, or [`LINGER`] after the batch otherwise. A stream of
    /// writes then costs about one flush per [`LINGER`], not two per batch.
    async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>, durable: watch::Sender<u64>) {
        // Records written, and of them flushed (what `durable` says).
        let (mut written, mut flushed) = (0u64, 0u64);
        // Callbacks of `Flushed` appends written but not flushed yet.
        let mut waiting: Vec<LogFlushed<TypeConfig>> = Vec::new();
        let mut since = tokio::time::Instant::now();
        let mut batch = Vec::new();
        loop {
            // Wait for records, or for the moment the ones written are due.
            let mut due = false;
            if written > flushed {
                // Biased: a steady stream of records does not put off the flush.
                tokio::select! {
                    biased;
                    () = self.urgent.notified() => due = true,
                    () = tokio::time::sleep_until(since + LINGER) => due = true,
                    n = jobs.recv_many(&mut batch, MAX_BATCH) => due = n == 0, // closed: flush what is left
                }
            } else {
                jobs.recv_many(&mut batch, MAX_BATCH).await;
            }
            // Unless someone waits for them, more records join these for up
            // to LINGER, so that one flush serves the lot. The writer sleeps
            // through that time and then takes what queued, rather than
            // waking for each record (a wake-up costs more than a command).
            let mut urgent = due || !waiting.is_empty() || batch.iter().any(|job| job.flushed.is_some());
            if !batch.is_empty() && !urgent {
                tokio::select! {
                    biased;
                    () = self.urgent.notified() => urgent = true,
                    () = tokio::time::sleep(LINGER) => {}
                }
                while batch.len() < MAX_BATCH
                    && let Ok(job) = jobs.try_recv()
                {
                    urgent |= job.flushed.is_some();
                    batch.push(job);
                }
            }
            // One flush makes the file data written so far durable before
            // any record that may map it, and the records written before.
            let data = self.data_written.swap(false, Ordering::AcqRel);
            if data || written > flushed && urgent {
                if let Err(e) = flush(&self.store, &self.place.blob).await {
                    return self.fail(&format!("flushing after page {}", self.next_page), e, waiting, batch);
                }
                if written > flushed {
                    flushed = written;
                    let _ = durable.send(flushed);
                    for f in waiting.drain(..) {
                        f.log_io_completed(Ok(()));
                    }
                }
            }
            if batch.is_empty() {
                if jobs.is_closed() && jobs.is_empty() && written == flushed {
                    return;
                }
                continue;
            }
            let mut bytes = Vec::new();
            for job in &mut batch {
                let crc = seal(&mut job.bytes, self.prev_crc);
                self.prev_crc = crc;
                bytes.append(&mut job.bytes);
            }
            let pages = (bytes.len() / PAGE_SIZE) as u64;
            if let Err(e) = write_pages(&self.store, &self.place.blob, self.next_page, &bytes).await {
                return self.fail(&format!("writing {pages} pages at page {}", self.next_page), e, waiting, batch);
            }
            self.next_page += pages;
            if written == flushed {
                since = tokio::time::Instant::now();
            }
            written += batch.len() as u64;
            waiting.extend(batch.drain(..).filter_map(|job| job.flushed));
            if urgent || !waiting.is_empty() {
                self.urgent.notify_one(); // flushed at the top of the loop
            }
            if self.should_rotate() {
                // The base record holds everything written so far, and is flushed.
                match self.rotate().await {
                    Ok(()) => {
                        flushed = written;
                        let _ = durable.send(flushed);
                        for f in waiting.drain(..) {
                            f.log_io_completed(Ok(()));
                        }
                    }
                    Err(e) => {
                        // The old blob stays in use; the next batch tries again.
                        tracing::error!("metadata log: rotating the log blob failed: {e}");
                        self.rotate_at = self.next_page + ROTATE_MIN;
                    }
                }
            }
        }
    }

    /// Stops the writer after a failed write or flush: nothing after the
    /// last flush may count as durable.
    fn fail(&self, what: &str, e: crate::BlobError, waiting: Vec<LogFlushed<TypeConfig>>, batch: Vec<Job>) {
        tracing::error!("metadata log: {what} failed: {e}");
        for f in waiting.into_iter().chain(batch.into_iter().filter_map(|job| job.flushed)) {
            f.log_io_completed(Err(std::io::Error::other(e.to_string())));
        }
    }

    fn should_rotate(&self) -> bool {
        self.next_page >= self.rotate_at
            || self.store.free_clusters() < self.low_space
                && self.inner.lock().unwrap_or_else(|p| p.into_inner()).purged != self.base_purged
    }

    /// Moves the log to a new blob holding it as one `Base` record.
    async fn rotate(&mut self) -> std::result::Result<(), crate::BlobError> {
        let (s, root) = (self.store.clone(), self.place.root);
        let (base, purged) = {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let entries = inner.entries.values().cloned().collect();
            (Record::Base { vote: inner.vote, purged: inner.purged, entries }, inner.purged)
        };
        // The data the base's entries map was written before they were
        // appended, so before this flush: durable before the base is.
        flush(&s, &self.place.blob).await?;
        let mut bytes = base.encode().map_err(|e| crate::BlobError::MetaGroup(e.to_string()))?;
        let crc = seal(&mut bytes, 0);
        let pages = (bytes.len() / PAGE_SIZE) as u64;
        let clusters = pages.div_ceil(s.pages_per_cluster()).max(16);
        let new =
            s.create_blob(crate::BlobOptions { num_clusters: clusters, thin: true, ..Default::default() }).await?;
        s.sync_blob(new).await?;
        // Should a crash come before the switch, the next open deletes it.
        s.set_xattr(root, super::LOG_DISCARD_XATTR, &new.to_le_bytes()).await?;
        s.sync_blob(root).await?;
        let handle = s.open_blob(new).await?;
        let blob = handle.shared().clone();
        if let Err(e) = async {
            write_pages(&s, &blob, 0, &bytes).await?;
            flush(&s, &blob).await
        }
        .await
        {
            // Not the log: gone now, or at the next open if this fails too.
            if handle.close().await.is_ok() && s.delete_blob(new).await.is_ok() {
                let _ = s.remove_xattr(root, super::LOG_DISCARD_XATTR).await;
            }
            return Err(e);
        }
        // The switch: from here on the new blob is the log.
        let old = self.place.blob.id();
        s.set_xattr(root, super::LOG_XATTR, &new.to_le_bytes()).await?;
        s.set_xattr(root, super::LOG_DISCARD_XATTR, &old.to_le_bytes()).await?;
        s.sync_blob(root).await?;
        tracing::info!("metadata log rotated: {} pages in blob {old} became {pages} in blob {new}", self.next_page);
        self.place.blob = blob;
        self.next_page = pages;
        self.prev_crc = crc;
        self.rotate_at = ROTATE_MIN.max(2 * pages);
        self.base_purged = purged;
        if let Some(old_handle) = self.place.held.replace(handle).await? {
            old_handle.close().await?;
        }
        s.delete_blob(old).await?;
        s.remove_xattr(root, super::LOG_DISCARD_XATTR).await?;
        s.sync_blob(root).await
    }
}

/// Fills in a record's chain (`prev`) and CRC; returns the CRC.
fn seal(rec: &mut [u8], prev: u32) -> u32 {
    rec[8..12].copy_from_slice(&prev.to_le_bytes());
    let len = u32::from_le_bytes(rec[4..8].try_into().expect("4 bytes")) as usize;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[..12]), &rec[HEADER..HEADER + len]);
    rec[12..16].copy_from_slice(&crc.to_le_bytes());
    crc
}

/// Writes whole pages of the log blob (growing it as needed); not flushed.
async fn write_pages(
    store: &Blobstore,
    blob: &Arc<BlobShared>,
    page: u64,
    bytes: &[u8],
) -> std::result::Result<(), crate::BlobError> {
    let needed = (page + (bytes.len() / PAGE_SIZE) as u64).div_ceil(store.pages_per_cluster());
    if needed > blob.num_clusters() {
        // Grow by half again, at least what is needed.
        let grown = needed.max(blob.num_clusters() * 3 / 2).max(16);
        store.resize_blob(blob.id(), grown).await?;
        store.sync_blob(blob.id()).await?;
    }
    let home = store.home().clone();
    let buf = pmd::DmaBuf::copy_from(bytes)?;
    let c = store.io(&home, BlobIo::write(blob, page, buf, 0)).await?;
    c.status.map_err(|e| crate::BlobError::io(format!("writing the metadata log at page {page}"), e))
}

/// Flushes the device under the log blob.
async fn flush(store: &Blobstore, blob: &Arc<BlobShared>) -> std::result::Result<(), crate::BlobError> {
    let c = store.io(store.home(), BlobIo::flush(blob, 0)).await?;
    c.status.map_err(|e| crate::BlobError::io("flushing the metadata log".to_string(), e))
}

/// Reads the log blob's records into `inner`; returns where the next record
/// goes and the CRC it chains to.
async fn replay(
    store: &Blobstore,
    blob: &Arc<BlobShared>,
    inner: &mut Inner,
) -> std::result::Result<(u64, u32), crate::BlobError> {
    let home = store.home().clone();
    let end = blob.num_clusters() * store.pages_per_cluster();
    let (mut page, mut prev_crc) = (0u64, 0u32);
    let mut window: Vec<u8> = Vec::new();
    let mut window_start = 0u64;
    // Reads pages [from, from + n) through a window of larger reads.
    let read = async |from: u64, n: u64, window: &mut Vec<u8>, window_start: &mut u64| {
        let have = *window_start + (window.len() / PAGE_SIZE) as u64;
        if from < *window_start || from + n > have {
            let count = n.max(READ_PAGES).min(end - from);
            let c =
                store.io(&home, BlobIo::read(blob, from, pmd::DmaBuf::new((count as usize) * PAGE_SIZE)?, 0)).await?;
            c.status.map_err(|e| crate::BlobError::io(format!("reading the metadata log at page {from}"), e))?;
            window.resize(count as usize * PAGE_SIZE, 0);
            c.bufs.copy_out(0, window);
            *window_start = from;
        }
        let start = ((from - *window_start) as usize) * PAGE_SIZE;
        Ok::<_, crate::BlobError>(window[start..start + n as usize * PAGE_SIZE].to_vec())
    };
    while page < end {
        let head = read(page, 1, &mut window, &mut window_start).await?;
        if &head[..4] != MAGIC {
            break;
        }
        let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
        let pages = (HEADER + len).div_ceil(PAGE_SIZE) as u64;
        if page + pages > end || u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) != prev_crc {
            break;
        }
        let rec = read(page, pages, &mut window, &mut window_start).await?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[..12]), &rec[HEADER..HEADER + len]);
        if crc != u32::from_le_bytes(rec[12..16].try_into().expect("4 bytes")) {
            break;
        }
        let record: Record =
            postcard::from_bytes(&rec[HEADER..HEADER + len]).map_err(|e| crate::BlobError::Corrupt {
                location: format!("metadata log blob {}, page {page}", blob.id()),
                reason: format!("a record with a good CRC does not decode: {e}"),
            })?;
        match record {
            Record::Entries(entries) => inner.entries.extend(entries.into_iter().map(|e| (e.log_id.index, e))),
            Record::Truncate(from) => drop(inner.entries.split_off(&from)),
            Record::Purge(upto) => {
                inner.entries = inner.entries.split_off(&(upto.index + 1));
                inner.purged = Some(upto);
            }
            Record::Vote(v) => inner.vote = Some(v),
            Record::Base { vote, purged, entries } => {
                inner.vote = vote;
                inner.purged = purged;
                inner.entries = entries.into_iter().map(|e| (e.log_id.index, e)).collect();
            }
        }
        prev_crc = crc;
        page += pages;
    }
    Ok((page, prev_crc))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        Ok(self.lock().entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let inner = self.lock();
        let last = inner.entries.values().next_back().map(|e| e.log_id).or(inner.purged);
        Ok(LogState { last_purged_log_id: inner.purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<()> {
        let n = {
            let mut inner = self.lock();
            inner.vote = Some(*vote);
            self.queue(&mut inner, &Record::Vote(*vote), None)?
        };
        // A vote is always durable before it counts.
        self.wait_durable(n).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>> {
        Ok(self.lock().vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let mut inner = self.lock();
        inner.entries.extend(entries.iter().map(|e| (e.log_id.index, e.clone())));
        match self.durability {
            Durability::Flushed => {
                self.queue(&mut inner, &Record::Entries(entries), Some(callback))?;
            }
            Durability::WriteBehind => {
                self.queue(&mut inner, &Record::Entries(entries), None)?;
                callback.log_io_completed(Ok(()));
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<()> {
        let n = {
            let mut inner = self.lock();
            drop(inner.entries.split_off(&log_id.index));
            self.queue(&mut inner, &Record::Truncate(log_id.index), None)?
        };
        self.wait_durable(n).await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<()> {
        let mut inner = self.lock();
        inner.entries = inner.entries.split_off(&(log_id.index + 1));
        inner.purged = Some(log_id);
        self.queue(&mut inner, &Record::Purge(log_id), None)?;
        Ok(())
    }
}
