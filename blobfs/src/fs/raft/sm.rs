//! The Raft state machine of the metadata group: [`MetaState`] in memory,
//! shared with readers, and its snapshots in blobs.
//!
//! A snapshot is the postcard encoding of a `Snap` (last applied log id,
//! membership, the state), followed by that of the state's dedupe index
//! (absent from snapshots made before it existed, which load with an empty
//! one), written to a new blob; the root blob's xattr
//! `claudefs.fs.snapshot` then names it and the old one is deleted. A
//! snapshot is durable once that xattr's blob sync is, so a crash while one
//! is taken leaves the previous one in place (and at worst a leaked blob,
//! which the next start deletes).

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{CmdResult, TypeConfig, xattr_u64};
use crate::Blobstore;
use crate::format::PAGE_SIZE;
use crate::fs::MetaState;

/// The root blob's xattr naming the current snapshot blob.
pub const SNAPSHOT_XATTR: &str = "claudefs.fs.snapshot";

type Result<T> = std::result::Result<T, StorageError<u64>>;

#[derive(Serialize, Deserialize)]
struct Snap {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    state: MetaState,
}

/// The state machine (cheap to clone: the snapshot builder is a clone).
#[derive(Clone)]
pub struct StateMachine {
    pub(super) state: Arc<RwLock<MetaState>>,
    inner: Arc<tokio::sync::Mutex<Applied>>,
    store: Blobstore,
    root: u64,
    /// Commands answered ahead: each leaves it as it applies.
    ahead: Arc<super::ahead::Ahead>,
}

struct Applied {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    /// The current snapshot: its meta and bytes.
    current: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
}

/// The state alone as a snapshot holds it: the state, then its dedupe
/// index (for tests and the fuzz target of the decoder).
pub fn encode_state(state: &MetaState) -> Vec<u8> {
    let bytes = postcard::to_stdvec(state).expect("a state encodes");
    postcard::to_extend(state.reduce_index(), bytes).expect("an index encodes")
}

/// Decodes what [`encode_state`] made (untrusted bytes: any error, never a
/// panic).
pub fn decode_state(bytes: &[u8]) -> std::result::Result<MetaState, postcard::Error> {
    let (mut state, rest): (MetaState, _) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        state.set_reduce_index(postcard::from_bytes(rest)?);
    }
    Ok(state)
}

/// A snapshot's `Snap` and the dedupe index after it, if any.
fn decode(bytes: &[u8]) -> std::result::Result<Snap, postcard::Error> {
    let (mut snap, rest): (Snap, _) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        snap.state.set_reduce_index(postcard::from_bytes(rest)?);
    }
    Ok(snap)
}

fn io_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_snapshot(None, &e).into()
}

impl StateMachine {
    /// Loads the current snapshot named by the root blob, or starts from
    /// `fresh` if there is none.
    pub(crate) async fn open(
        store: Blobstore,
        root: u64,
        fresh: MetaState,
        ahead: Arc<super::ahead::Ahead>,
    ) -> std::result::Result<Self, crate::BlobError> {
        let xattrs = store.xattrs(root).await?;
        let (applied, state) = match xattr_u64(&xattrs, SNAPSHOT_XATTR)? {
            Some(blob) => {
                let bytes = read_blob(&store, blob).await?;
                let snap = decode(&bytes).map_err(|e| crate::BlobError::Corrupt {
                    location: format!("metadata snapshot blob {blob}"),
                    reason: format!("does not decode: {e}"),
                })?;
                let meta = SnapshotMeta {
                    last_log_id: snap.last_applied,
                    last_membership: snap.membership.clone(),
                    snapshot_id: format!("blob-{blob}"),
                };
                let applied = Applied {
                    last_applied: snap.last_applied,
                    membership: snap.membership,
                    current: Some((meta, bytes)),
                };
                (applied, snap.state)
            }
            None => (Applied { last_applied: None, membership: StoredMembership::default(), current: None }, fresh),
        };
        Ok(StateMachine {
            state: Arc::new(RwLock::new(state)),
            inner: Arc::new(tokio::sync::Mutex::new(applied)),
            store,
            root,
            ahead,
        })
    }

    /// Writes `bytes` to a new blob, makes it the current snapshot, deletes
    /// the previous one.
    async fn persist(&self, bytes: &[u8]) -> std::result::Result<u64, crate::BlobError> {
        let s = &self.store;
        let clusters = (bytes.len() as u64).div_ceil(s.cluster_size() as u64).max(1);
        let blob =
            s.create_blob(crate::BlobOptions { num_clusters: clusters, thin: false, ..Default::default() }).await?;
        let handle = s.open_blob(blob).await?;
        let mut padded = bytes.to_vec();
        padded.resize(padded.len().next_multiple_of(PAGE_SIZE).max(PAGE_SIZE), 0);
        let home = s.home().clone();
        let c = s.io(&home, crate::BlobIo::write(handle.shared(), 0, pmd::DmaBuf::copy_from(&padded)?, 0)).await?;
        c.status.map_err(|e| crate::BlobError::io(format!("writing metadata snapshot blob {blob}"), e))?;
        let c = s.io(&home, crate::BlobIo::flush(handle.shared(), 0)).await?;
        c.status.map_err(|e| crate::BlobError::io(format!("flushing metadata snapshot blob {blob}"), e))?;
        handle.close().await?;
        s.set_xattr(blob, "claudefs.fs.snapshot_len", &(bytes.len() as u64).to_le_bytes()).await?;
        s.sync_blob(blob).await?;
        let old = xattr_u64(&s.xattrs(self.root).await?, SNAPSHOT_XATTR)?;
        s.set_xattr(self.root, SNAPSHOT_XATTR, &blob.to_le_bytes()).await?;
        s.sync_blob(self.root).await?;
        if let Some(old) = old {
            s.delete_blob(old).await?;
        }
        Ok(blob)
    }
}

/// A snapshot blob's bytes.
async fn read_blob(store: &Blobstore, blob: u64) -> std::result::Result<Vec<u8>, crate::BlobError> {
    let len = xattr_u64(&store.xattrs(blob).await?, "claudefs.fs.snapshot_len")?.ok_or_else(|| {
        crate::BlobError::Corrupt { location: format!("metadata snapshot blob {blob}"), reason: "no length".into() }
    })? as usize;
    let handle = store.open_blob(blob).await?;
    let home = store.home().clone();
    let pages = len.div_ceil(PAGE_SIZE).max(1);
    let c = store.io(&home, crate::BlobIo::read(handle.shared(), 0, pmd::DmaBuf::new(pages * PAGE_SIZE)?, 0)).await?;
    handle.close().await?;
    c.status.map_err(|e| crate::BlobError::io(format!("reading metadata snapshot blob {blob}"), e))?;
    let mut bytes = vec![0; pages * PAGE_SIZE];
    c.bufs.copy_out(0, &mut bytes);
    bytes.truncate(len);
    Ok(bytes)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let mut inner = self.inner.lock().await;
        let snap = Snap {
            last_applied: inner.last_applied,
            membership: inner.membership.clone(),
            state: self.state.read().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        let mut bytes = postcard::to_stdvec(&snap).map_err(io_err)?;
        bytes = postcard::to_extend(snap.state.reduce_index(), bytes).map_err(io_err)?;
        let blob = self.persist(&bytes).await.map_err(io_err)?;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("blob-{blob}"),
        };
        inner.current = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>)> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CmdResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.inner.lock().await;
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Ok(crate::fs::Reply::Done),
                EntryPayload::Normal(cmd) => {
                    let r = state.apply(&cmd);
                    self.ahead.applied(&cmd, &r);
                    r
                }
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(crate::fs::Reply::Done)
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let bytes = snapshot.into_inner();
        let snap = decode(&bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        self.persist(&bytes).await.map_err(io_err)?;
        let mut inner = self.inner.lock().await;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = snap.state;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.current = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let inner = self.inner.lock().await;
        Ok(inner
            .current
            .as_ref()
            .map(|(meta, bytes)| Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(bytes.clone())) }))
    }
}
