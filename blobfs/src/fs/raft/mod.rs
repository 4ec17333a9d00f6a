//! The metadata group: [`MetaState`] replicated by openraft, with its log
//! and snapshots in blobs.
//!
//! A single server runs a one-member group, the same path a cluster takes.
//! Its blobs hang off a *root blob* (the blobstore's super blob), whose
//! xattrs name the log blob and the current snapshot blob; the root's own
//! blob sync makes a change of either atomic.

mod ahead;
mod log;
mod sm;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};

pub use ahead::{MAX_AHEAD, View};
pub use log::{Durability, LogStore};
pub use sm::{StateMachine, decode_state, encode_state};

use futures_util::FutureExt;

use super::{Cmd, Errno, Ino, MetaState, Reply, Time};
use crate::{BlobError, BlobOptions, Blobstore};

/// What a command returns through Raft.
pub type CmdResult = Result<Reply, Errno>;

openraft::declare_raft_types!(
    /// The metadata group's Raft types.
    pub TypeConfig:
        D = Cmd,
        R = CmdResult,
);

/// The root blob's xattr naming the log blob.
const LOG_XATTR: &str = "claudefs.fs.log";
/// The root blob's xattr naming a log blob to delete: the one a rotation
/// left behind, or the half-written one of a rotation a crash cut short.
const LOG_DISCARD_XATTR: &str = "claudefs.fs.log.discard";
/// The root blob's xattr with the file system's chunk size (set at mkfs).
const CHUNK_XATTR: &str = "claudefs.fs.chunk_size";
/// The root blob's xattr with the time the file system was made (ns): the
/// root directory's times in the state the log replays onto.
const BORN_XATTR: &str = "claudefs.fs.born";

/// This server's id in the group.
const NODE: u64 = 1;

/// Reads a little-endian u64 xattr, if present.
pub(crate) fn xattr_u64(xattrs: &BTreeMap<String, Vec<u8>>, name: &str) -> Result<Option<u64>, BlobError> {
    match xattrs.get(name) {
        None => Ok(None),
        Some(v) => v.as_slice().try_into().map(|b| Some(u64::from_le_bytes(b))).map_err(|_| BlobError::Corrupt {
            location: format!("file system root blob, xattr {name}"),
            reason: format!("{} bytes where 8 belong", v.len()),
        }),
    }
}

/// Options of [`MetaRaft::open`].
#[derive(Debug, Clone)]
pub struct MetaOptions {
    /// When an append counts as durable (see [`Durability`]).
    pub durability: Durability,
    /// Take a snapshot (and let go of the log before it) after this many entries.
    pub snapshot_every: u64,
    /// Map unit of a new file system, in bytes (a write replaces whole
    /// units; see [`crate::fs::MetaState`]).
    pub chunk_size: u64,
}

impl Default for MetaOptions {
    fn default() -> Self {
        MetaOptions { durability: Durability::WriteBehind, snapshot_every: 10_000, chunk_size: 4096 }
    }
}

/// The metadata of a file system, replicated by a (one-member) Raft group.
#[derive(Clone)]
pub struct MetaRaft {
    raft: Raft<TypeConfig>,
    state: Arc<RwLock<MetaState>>,
    log: LogStore,
    /// The log blob, open until [`MetaRaft::shutdown`].
    log_blob: Arc<super::HeldBlob>,
    /// Where the group's tasks run.
    thread: Arc<MetaThread>,
    /// Commands answered before they apply.
    ahead: Arc<ahead::Ahead>,
}

/// A thread of its own for the group's tasks (openraft's core and state
/// machine worker), on a single-threaded runtime. A command passes from
/// its proposer to the core, to the state machine and back: on one thread
/// those hand-offs are queue pushes, where on a pool each could be a
/// wake-up of another thread. Proposers that run here too
/// ([`MetaRaft::runtime`]) add none.
struct MetaThread {
    handle: tokio::runtime::Handle,
    /// Dropped to stop the thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl MetaThread {
    fn start() -> Result<MetaThread, BlobError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BlobError::MetaGroup(format!("starting the metadata runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("claudefs-meta".into())
            .spawn(move || {
                // Runs until every `MetaRaft` is gone; the tasks left then
                // (a stopped group's) are dropped with the runtime.
                let _ = rt.block_on(stopped);
            })
            .map_err(|e| BlobError::MetaGroup(format!("starting the metadata thread: {e}")))?;
        Ok(MetaThread { handle, _stop: stop })
    }
}

impl MetaRaft {
    /// Opens the file system whose root blob is the store's super blob,
    /// creating an empty one (owned by root) if the store has none. Runs on
    /// the current tokio runtime.
    pub async fn open(store: &Blobstore, opts: MetaOptions) -> Result<MetaRaft, BlobError> {
        let (root, fresh) = match store.get_super().await? {
            Some(root) => (root, false),
            None => {
                let root = store.create_blob(BlobOptions::default()).await?;
                store.set_xattr(root, CHUNK_XATTR, &opts.chunk_size.to_le_bytes()).await?;
                store.set_xattr(root, BORN_XATTR, &wall_clock_ns().to_le_bytes()).await?;
                store.sync_blob(root).await?;
                store.set_super(Some(root)).await?;
                (root, true)
            }
        };
        let xattrs = store.xattrs(root).await?;
        let chunk_size = xattr_u64(&xattrs, CHUNK_XATTR)?.ok_or_else(|| BlobError::Corrupt {
            location: format!("file system root blob {root}"),
            reason: format!("no {CHUNK_XATTR}: this blobstore's super blob is not a ClaudeFS file system"),
        })?;
        let log_blob = match xattr_u64(&xattrs, LOG_XATTR)? {
            Some(b) => b,
            None => {
                let b = store.create_blob(BlobOptions { num_clusters: 16, thin: true, ..Default::default() }).await?;
                store.sync_blob(b).await?;
                store.set_xattr(root, LOG_XATTR, &b.to_le_bytes()).await?;
                store.sync_blob(root).await?;
                b
            }
        };
        if let Some(stale) = xattr_u64(&xattrs, LOG_DISCARD_XATTR)?.filter(|&b| b != log_blob) {
            tracing::info!("deleting metadata log blob {stale}, which a log rotation left behind");
            match store.delete_blob(stale).await {
                Ok(()) | Err(BlobError::NoSuchBlob(_)) => {}
                Err(e) => return Err(e),
            }
            store.remove_xattr(root, LOG_DISCARD_XATTR).await?;
            store.sync_blob(root).await?;
        }
        let born = Time(xattr_u64(&xattrs, BORN_XATTR)?.map_or_else(wall_clock_ns, |t| t as i64));
        let ahead = Arc::new(ahead::Ahead::new());
        let sm = StateMachine::open(store.clone(), root, MetaState::new(chunk_size, 0, 0, born), ahead.clone()).await?;
        let log_handle = store.open_blob(log_blob).await?;
        let shared = log_handle.shared().clone();
        let held = Arc::new(super::HeldBlob::new(log_handle));
        let log = LogStore::open(store.clone(), log::Place { root, blob: shared, held: held.clone() }, opts.durability)
            .await?;
        let config = Config {
            cluster_name: "claudefs-meta".into(),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every),
            max_in_snapshot_log_to_keep: 0,
            heartbeat_interval: 250,
            election_timeout_min: 300,
            election_timeout_max: 600,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| BlobError::MetaGroup(e.to_string()))?);
        let state = sm.state.clone();
        let thread = Arc::new(MetaThread::start()?);
        let log_store = log.clone();
        let raft = thread
            .handle
            .spawn(async move { Raft::new(NODE, config, NoPeers, log_store, sm).await })
            .await
            .map_err(|e| BlobError::MetaGroup(format!("starting the metadata group: {e}")))?
            .map_err(|e| BlobError::MetaGroup(format!("starting the metadata group: {e}")))?;
        let members = BTreeMap::from([(NODE, BasicNode::default())]);
        if fresh || log.last_index().is_none() {
            raft.initialize(members).await.map_err(|e| BlobError::MetaGroup(format!("initializing: {e}")))?;
        }
        let me = MetaRaft { raft, state, log, log_blob: held, thread, ahead };
        me.catch_up().await?;
        let (raft, handle, ahead) = (me.raft.clone(), me.thread.handle.clone(), me.ahead.clone());
        me.thread.handle.spawn(async move {
            loop {
                ahead.kick.notified().await;
                tokio::time::sleep(OUTBOX_LINGER).await;
                propose_deferred(&raft, &handle, &ahead, &mut ahead.book());
            }
        });
        Ok(me)
    }

    /// Waits until this member leads and has applied every entry of its log,
    /// so reads see everything written before a restart.
    async fn catch_up(&self) -> Result<(), BlobError> {
        let last = self.log.last_index();
        let timeout = Some(std::time::Duration::from_secs(30));
        self.raft
            .wait(timeout)
            .state(openraft::ServerState::Leader, "become leader")
            .await
            .map_err(|e| BlobError::MetaGroup(format!("the metadata group found no leader: {e}")))?;
        if let Some(last) = last {
            self.raft
                .wait(timeout)
                .applied_index_at_least(Some(last), "replay the log")
                .await
                .map_err(|e| BlobError::MetaGroup(format!("replaying the metadata log: {e}")))?;
        }
        Ok(())
    }

    /// The runtime of the group's tasks: a task that proposes commands
    /// runs best here (`MetaThread`).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.thread.handle
    }

    /// Proposes a command and returns its reply once it is applied.
    pub async fn write(&self, cmd: Cmd) -> Result<Reply, Errno> {
        let naming = matches!(
            cmd,
            Cmd::Mknod { .. }
                | Cmd::Mkdir { .. }
                | Cmd::Symlink { .. }
                | Cmd::Link { .. }
                | Cmd::Unlink { .. }
                | Cmd::Rmdir { .. }
                | Cmd::Rename { .. }
        );
        let sent = {
            // Behind what was answered ahead before it.
            let mut book = self.ahead.book();
            self.propose_deferred(&mut book);
            if naming {
                book.count_naming();
            }
            // The group's queue is unbounded: the send completes here.
            self.raft.client_write_ff(cmd).now_or_never()
        };
        let _naming = naming.then(|| self.ahead.naming());
        let Some(Ok(reply)) = sent else {
            tracing::error!("the metadata group took no command: it has stopped");
            return Err(Errno::EIO);
        };
        match reply.await {
            Ok(Ok(r)) => r.data,
            failed => {
                tracing::error!("metadata write failed: {failed:?}");
                Err(Errno::EIO)
            }
        }
    }

    /// Proposes the commands answered ahead that wait in the book's outbox.
    fn propose_deferred(&self, book: &mut ahead::Book) {
        propose_deferred(&self.raft, &self.thread.handle, &self.ahead, book)
    }

    /// Proposes `Cmd::Unlink { parent, name, now }` if it is sure to
    /// succeed, so that it can be answered now (see [`View`]). Once it has
    /// applied, `then` gets its reply on the group's thread; [`sync`]
    /// waits for both, and reports an error `then` returns. False, with
    /// nothing done, when the unlink must go through [`MetaRaft::write`]:
    /// the name is missing or a directory, a command that adds or removes
    /// names is in flight, or [`MAX_AHEAD`] commands are ahead already.
    ///
    /// [`sync`]: MetaRaft::sync
    pub fn unlink_ahead<F, Fut>(&self, parent: Ino, name: &[u8], now: Time, then: F) -> bool
    where
        F: FnOnce(CmdResult) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Errno>> + Send + 'static,
    {
        let cmd = Cmd::Unlink { parent, name: name.to_vec(), now };
        self.ahead(
            cmd,
            |state, book| book.can_unlink(state, parent, name),
            |book, &ino| book.answered(parent, name.to_vec(), ino, now),
            then,
        )
        .is_some()
    }

    /// Proposes `Cmd::Mknod` of a regular file `name` in `parent` (`perm`,
    /// umask applied, by `by`) if it is sure to succeed, so that it can be
    /// answered now: the attributes it will give the file (see [`View`];
    /// [`MetaRaft::wait_created`] waits for the state itself to have it).
    /// None, with nothing done, when the create must go through
    /// [`MetaRaft::write`]: the name is taken or the directory missing, a
    /// command that adds or removes names is in flight, new files in the
    /// directory take a reduce policy, or [`MAX_AHEAD`] commands are ahead
    /// already. [`sync`] waits for it and reports if it failed.
    ///
    /// [`sync`]: MetaRaft::sync
    pub fn create_ahead(&self, parent: Ino, name: &[u8], perm: u32, by: super::Creator) -> Option<super::Attr> {
        let cmd = Cmd::Mknod { parent, name: name.to_vec(), kind: super::FileKind::File, perm, rdev: 0, by };
        let planned = self.ahead(
            cmd,
            |state, book| book.can_create(state, parent, name, perm, by),
            |book, (attr, cookie)| book.created(parent, name.to_vec(), attr.clone(), *cookie),
            |r| async move { r.map(|_| ()) },
        );
        planned.map(|(attr, _)| attr)
    }

    /// Answers `cmd` ahead of its apply if `plan` (given the applied state
    /// and the book, both locked meanwhile) says it is sure to succeed;
    /// `record` enters it in the book. It waits in the book's outbox, to
    /// be proposed with others ([`OUTBOX_LINGER`], [`OUTBOX_BATCH`]) and
    /// ahead of anything proposed after it. `then` runs on the group's
    /// thread with its reply once it has applied, and the book hears when
    /// both are done. Returns what `plan` said, or None with nothing done.
    fn ahead<T, F, Fut>(
        &self,
        cmd: Cmd,
        plan: impl FnOnce(&MetaState, &ahead::Book) -> Option<T>,
        record: impl FnOnce(&mut ahead::Book, &T) -> u64,
        then: F,
    ) -> Option<T>
    where
        F: FnOnce(CmdResult) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Errno>> + Send + 'static,
    {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let mut book = self.ahead.book();
        let planned = plan(&state, &book)?;
        let seq = record(&mut book, &planned);
        book.outbox.push(ahead::Deferred { seq, cmd, then: Box::new(move |r| Box::pin(then(r))) });
        match book.outbox.len() {
            1 => self.ahead.kick.notify_one(),
            n if n >= OUTBOX_BATCH => self.propose_deferred(&mut book),
            _ => {}
        }
        Some(planned)
    }

    /// Blocks until `ino`, if it is a file created ahead, has applied
    /// (microseconds): every question about it is then answered by the
    /// state. Returns at once for any other inode.
    pub fn wait_created(&self, ino: Ino) {
        self.ahead.wait_created(ino, |book| self.propose_deferred(book))
    }

    /// Reads the state (as of every write that has returned, and every
    /// command answered ahead). `f` must not read again: the overlay's lock
    /// is held while it runs.
    pub fn read<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&self.ahead.book().view(&state))
    }

    /// Waits until every write that has returned, and every command
    /// answered ahead, is durable (`fsync`).
    pub async fn sync(&self) -> Result<(), Errno> {
        self.propose_deferred(&mut self.ahead.book());
        self.ahead.settle().await?;
        self.log.sync().await.map_err(|e| {
            tracing::error!("metadata sync failed: {e}");
            Errno::EIO
        })
    }

    /// Records queued to the log so far: every command that has returned
    /// is in one of them.
    pub fn log_position(&self) -> u64 {
        self.log.queued()
    }

    /// Records of the log durable so far (rises to [`MetaRaft::log_position`]).
    pub fn durable_records(&self) -> tokio::sync::watch::Receiver<u64> {
        self.log.durable()
    }

    /// The flag the data path sets after writing file data (see
    /// [`LogStore::data_written`]).
    pub fn data_written(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.log.data_written()
    }

    /// Takes a snapshot now (and lets go of the log before it).
    pub async fn snapshot(&self) -> Result<(), Errno> {
        self.raft.trigger().snapshot().await.map_err(|_| Errno::EIO)?;
        let want = self.raft.metrics().borrow().last_applied.map(|l| l.index);
        self.raft
            .wait(Some(std::time::Duration::from_secs(60)))
            .metrics(|m| m.snapshot.map(|s| s.index) >= want, "snapshot")
            .await
            .map_err(|_| Errno::EIO)?;
        Ok(())
    }

    /// Stops the group (after syncing the log) and closes the log blob.
    pub async fn shutdown(&self) -> Result<(), Errno> {
        self.sync().await?;
        self.raft.shutdown().await.map_err(|_| Errno::EIO)?;
        self.log_blob.close("metadata log").await
    }

    /// Orphans left by a previous run (nobody can have them open now).
    pub fn orphans(&self) -> BTreeSet<u64> {
        self.read(|s| s.orphans().collect())
    }
}

/// How long a command answered ahead may wait in the outbox: it is
/// answered, and readers see it, meanwhile. One proposal (a wake-up of the
/// group's thread, about 10 us of CPU on a VM) then serves many.
const OUTBOX_LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// Commands in the outbox that are proposed at once, without waiting out
/// the linger (well under [`MAX_AHEAD`]).
const OUTBOX_BATCH: usize = 32;

/// Proposes the commands answered ahead that wait in `book`'s outbox, in
/// order; one task on the group's thread hears their replies, runs what
/// each asked for, and settles them.
fn propose_deferred(
    raft: &Raft<TypeConfig>,
    handle: &tokio::runtime::Handle,
    ahead: &Arc<ahead::Ahead>,
    book: &mut ahead::Book,
) {
    if book.outbox.is_empty() {
        return;
    }
    let sent: Vec<_> = book
        .outbox
        .drain(..)
        // The group's queue is unbounded: each send completes here.
        .map(|d| (d.seq, raft.client_write_ff(d.cmd).now_or_never(), d.then))
        .collect();
    let ahead = ahead.clone();
    handle.spawn(async move {
        for (seq, sent, then) in sent {
            let r = match sent {
                Some(Ok(reply)) => match reply.await {
                    Ok(Ok(r)) => r.data,
                    failed => {
                        tracing::error!("metadata write of a command answered ahead failed: {failed:?}");
                        Err(Errno::EIO)
                    }
                },
                _ => {
                    tracing::error!("the metadata group took no command answered ahead: it has stopped");
                    Err(Errno::EIO)
                }
            };
            ahead.settled(seq, then(r).await.is_ok());
        }
    });
}

fn wall_clock_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// The network of a one-member group: there is nobody to talk to.
struct NoPeers;

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> Self::Network {
        NoPeers
    }
}

fn unreachable<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other("a one-member group has no peers")))
}

impl RaftNetwork<TypeConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable())
    }
}
