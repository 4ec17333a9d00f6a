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
    /// Unlinks answered before they apply.
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
        let _removing =
            matches!(cmd, Cmd::Unlink { .. } | Cmd::Rmdir { .. } | Cmd::Rename { .. }).then(|| self.ahead.removing());
        match self.raft.client_write(cmd).await {
            Ok(r) => r.data,
            Err(e) => {
                tracing::error!("metadata write failed: {e}");
                Err(Errno::EIO)
            }
        }
    }

    /// Proposes `Cmd::Unlink { parent, name, now }` if it is sure to
    /// succeed, so that it can be answered now (see [`View`]). Once it has
    /// applied, `then` gets its reply on the group's thread; [`sync`]
    /// waits for both, and reports an error `then` returns. False, with
    /// nothing done, when the unlink must go through [`MetaRaft::write`]:
    /// the name is missing or a directory, a command that removes names
    /// is in flight, or [`MAX_AHEAD`] unlinks are ahead already.
    ///
    /// [`sync`]: MetaRaft::sync
    pub fn unlink_ahead<F, Fut>(&self, parent: Ino, name: &[u8], now: Time, then: F) -> bool
    where
        F: FnOnce(CmdResult) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Errno>> + Send,
    {
        let (reply, seq) = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            let mut book = self.ahead.book();
            let Some(ino) = book.can_unlink(&state, parent, name) else { return false };
            // The group's queue is unbounded: the send completes here,
            // ahead of anything proposed after this check.
            let cmd = Cmd::Unlink { parent, name: name.to_vec(), now };
            let Some(Ok(reply)) = self.raft.client_write_ff(cmd).now_or_never() else { return false };
            (reply, book.answered(parent, name.to_vec(), ino, now))
        };
        let ahead = self.ahead.clone();
        self.thread.handle.spawn(async move {
            let r = match reply.await {
                Ok(Ok(r)) => r.data,
                failed => {
                    tracing::error!("metadata write of an unlink answered ahead failed: {failed:?}");
                    Err(Errno::EIO)
                }
            };
            ahead.settled(seq, then(r).await.is_ok());
        });
        true
    }

    /// Reads the state (as of every write that has returned, and every
    /// unlink answered ahead). `f` must not read again: the overlay's lock
    /// is held while it runs.
    pub fn read<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&self.ahead.book().view(&state))
    }

    /// Waits until every write that has returned, and every unlink
    /// answered ahead, is durable (`fsync`).
    pub async fn sync(&self) -> Result<(), Errno> {
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
